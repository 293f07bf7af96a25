"""Snapshots of user-facing text: committed files under tests/snapshots/, so a changed message shows
in review as a diff of that file. `UIW_UPDATE_SNAPSHOTS=1 pytest ...` rewrites them from what the
code says now (then read the diff before committing it).

A small helper rather than a plugin: syrupy keeps its files in __snapshots__/ beside each test
module and reports snapshots it did not visit, which misfires when xdist or -m/-k runs only some of
the tests; these files are plain text named by the test, one message each."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

SNAPSHOTS = Path(__file__).resolve().parents[1] / "snapshots"
UPDATE_VARIABLE = "UIW_UPDATE_SNAPSHOTS"


def normalise(text: str, places: dict[str, Path | str]) -> str:
    """`text` with each place's path written as its <NAME> (longest first, so a folder inside
    another is named as itself), the way the same mistake reads on any machine."""
    for name, place in sorted(places.items(), key=lambda item: -len(str(item[1]))):
        text = text.replace(str(place), f"<{name}>")
    return text


def assert_matches_snapshot(name: str, text: str) -> None:
    """`text` equals tests/snapshots/NAME.txt; with UIW_UPDATE_SNAPSHOTS=1 the file is (re)written."""
    path = SNAPSHOTS / f"{name}.txt"
    if os.environ.get(UPDATE_VARIABLE) == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.is_file(), f"{path}: no snapshot yet; hint: run the test with {UPDATE_VARIABLE}=1 and commit the file"
    want = path.read_text()
    if text != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), text.splitlines(True), str(path), "now"))
        raise AssertionError(
            f"{path}: the message changed:\n{diff}\nhint: if the new text is meant, rerun with {UPDATE_VARIABLE}=1"
        )
