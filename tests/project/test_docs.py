"""The documentation a newcomer walks: a short README, links that resolve inside the repository (a
clone alone must be enough), a module map that names every module, and no references to issue
numbers a reader cannot look up."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README_MAX_LINES = 150

# [text](target) links; images too. Code spans are removed first so that examples are not links.
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)


def _docs() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True, check=True)
    return [REPO / p for p in tracked.stdout.split() if not p.startswith("tests/fixtures/")]


def _anchor(heading: str) -> str:
    """GitHub's slug of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    text = _CODE.sub("", doc.read_text())
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def broken_links(doc: Path) -> list[str]:
    problems = []
    for target in _LINK.findall(_CODE.sub("", doc.read_text())):
        if re.match(r"^[a-z]+:", target):  # https:, mailto: ...: not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.is_relative_to(REPO):
            problems.append(f"{target}: leaves the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.relative_to(REPO)}")
    return problems


def test_readme_is_one_short_page() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the reference belongs in docs/"


@pytest.mark.parametrize("doc", _docs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_link_resolves_inside_the_repository(doc: Path) -> None:
    assert broken_links(doc) == []


def test_the_link_check_can_fail(tmp_path: Path) -> None:
    doc = REPO / "docs" / "_probe_for_link_test.md"
    try:
        doc.write_text("[a](missing.md) [b](../../outside.md) [c](design.md#no-such-heading) [d](design.md#layers)\n")
        assert [p.split(":")[0] for p in broken_links(doc)] == [
            "missing.md",
            "../../outside.md",
            "design.md#no-such-heading",
        ]
    finally:
        doc.unlink()


def test_the_module_map_names_every_module() -> None:
    index = (REPO / "docs" / "README.md").read_text()
    modules = sorted(
        p.relative_to(REPO).as_posix()
        for pkg in ("compiler", "runtime")
        for p in (REPO / pkg).rglob("*.py")
        if p.name != "__init__.py" and "_bundled" not in p.parts
    )
    missing = [m for m in modules if f"`{m}`" not in index]
    assert missing == [], "docs/README.md's module map lacks these modules"


def test_no_issue_numbers_in_docs_code_or_tests() -> None:
    """'issue 5' means nothing to a reader of the repository: say what it means instead."""
    tracked = subprocess.run(
        ["git", "grep", "-n", "-i", "-E", r"\bissues? #?[0-9]+", "--", ".", ":!tests/fixtures"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    hits = [line for line in tracked.stdout.splitlines() if not line.startswith("tests/project/test_docs.py")]
    assert hits == []
