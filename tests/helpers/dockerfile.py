"""The Dockerfile's steps, run without Docker (it cannot run on our machines): parsed from the file
itself, each stage in its own folder standing for its filesystem, one fresh virtual environment
standing for the base image's Python (with torch, as the base image has it).

What is kept of Docker's semantics: stages (``FROM <stage>`` starts from a copy of that stage's
folder), ``ARG`` defaults and ``--build-arg`` overrides (visible to ``RUN`` as variables), ``ENV``
(absolute paths in values are moved under the stage's folder), ``WORKDIR``, ``COPY`` from the
context (honouring ``.dockerignore``'s names) or ``--from`` a stage, ``RUN`` through ``/bin/sh -c``
with ``--mount`` flags dropped (a cache mount is a plain folder here; secrets are files under
``secrets/``), ``CMD``. Absolute paths inside ``RUN`` commands other than secrets are not moved:
the Dockerfile's commands use its variables instead.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    name: str
    root: Path
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"
    cmd: list[str] = field(default_factory=list)

    def path(self, p: str) -> Path:
        absolute = p if p.startswith("/") else f"{self.workdir.rstrip('/')}/{p}"
        return self.root / absolute.lstrip("/")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs: comments dropped, continuation lines joined."""
    out, current = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


def _ignored(context: Path) -> list[str]:
    f = context / ".dockerignore"
    lines = f.read_text().splitlines() if f.is_file() else []
    return [line.strip().removeprefix("**/") for line in lines if line.strip() and not line.startswith("#")]


def _copy(src: Path, dst: Path, ignore: list[str]) -> None:
    skip = shutil.ignore_patterns(*ignore) if ignore else None
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True, ignore=skip)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


@dataclass
class Build:
    context: Path
    work: Path
    base_env: dict[str, str]  # PATH with the venv first, HOME, ...: the base image's environment
    build_args: dict[str, str] = field(default_factory=dict)
    stages: dict[str, Stage] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def expand(self, text: str, stage: Stage, args: dict[str, str]) -> str:
        names = {**stage.env, **args}
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: names.get(m.group(1) or m.group(2), m.group(0)), text)

    def run(self, dockerfile: Path) -> Stage:
        """Every step in order; returns the last stage (the image)."""
        (self.work / "secrets").mkdir(parents=True, exist_ok=True)
        args: dict[str, str] = {}
        stage: Stage | None = None
        for word, rest in instructions(dockerfile.read_text()):
            if word == "FROM":
                stage, args = self._from(rest), {}
                continue
            if word == "ARG":
                name, _, default = rest.partition("=")
                args[name] = self.build_args.get(name, default)
                continue
            assert stage is not None, f"{word} before FROM"
            getattr(self, f"_{word.lower()}")(stage, rest, args)
        assert stage is not None
        return stage

    def _from(self, rest: str) -> Stage:
        parts = rest.split()
        name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else f"stage{len(self.stages)}"
        root = self.work / "stages" / name
        parent = self.stages.get(parts[0])
        if parent is not None:
            shutil.copytree(parent.root, root, symlinks=True)
            stage = Stage(name, root, dict(parent.env), parent.workdir)
        else:  # an external base image: its Python is the venv, its files an empty folder
            root.mkdir(parents=True)
            stage = Stage(name, root)
        self.stages[name] = stage
        return stage

    def _env(self, stage: Stage, rest: str, args: dict[str, str]) -> None:
        for item in shlex.split(rest):
            key, _, value = item.partition("=")
            value = self.expand(value, stage, args)
            stage.env[key] = str(stage.path(value)) if value.startswith("/") else value

    def _workdir(self, stage: Stage, rest: str, args: dict[str, str]) -> None:
        stage.workdir = rest if rest.startswith("/") else f"{stage.workdir.rstrip('/')}/{rest}"
        stage.path(".").mkdir(parents=True, exist_ok=True)

    def _copy(self, stage: Stage, rest: str, args: dict[str, str]) -> None:
        parts = shlex.split(rest)
        origin = None
        while parts[0].startswith("--"):
            flag = parts.pop(0)
            if flag.startswith("--from="):
                origin = self.stages[flag.removeprefix("--from=")]
        *sources, dst = parts
        for src in sources:
            target = stage.path(dst)
            if dst.endswith("/") or len(sources) > 1:
                target = target / Path(src).name
            if origin is not None:
                _copy(origin.path(src), target, [])
            else:
                assert not any(fnmatch.fnmatch(src, p) for p in _ignored(self.context)), f"{src} is .dockerignored"
                _copy(self.context / src, target, _ignored(self.context))
        self.log.append(f"COPY {rest}")

    def _run(self, stage: Stage, rest: str, args: dict[str, str]) -> None:
        while rest.startswith("--mount="):
            _, _, rest = rest.partition(" ")
            rest = rest.lstrip()
        command = rest.replace("/run/secrets/", f"{self.work / 'secrets'}/")
        env = {**self.base_env, **args, **stage.env}
        cwd = stage.path(".")
        t0 = time.monotonic()
        proc = subprocess.run(["/bin/sh", "-c", command], cwd=cwd, env=env, capture_output=True, text=True)
        self.log.append(f"RUN {command[:200]} -> {proc.returncode} in {time.monotonic() - t0:.0f} s")
        (self.work / "steps.log").write_text("\n".join(self.log) + "\n")
        assert proc.returncode == 0, f"RUN {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"

    def _cmd(self, stage: Stage, rest: str, args: dict[str, str]) -> None:
        stage.cmd = json.loads(rest)

    def _label(self, stage: Stage, rest: str, args: dict[str, str]) -> None:
        pass


def venv_env(venv: Path, home: Path) -> dict[str, str]:
    """The environment of the base image's shell: the venv's python first on PATH, and nothing of
    this checkout (no PYTHONPATH, no UIW_* settings)."""
    keep = ("LANG", "LC_ALL", "TMPDIR", "PIP_FIND_LINKS", "PIP_DEFAULT_TIMEOUT", "PIP_CERT", "PIP_INDEX_URL")
    env = {k: v for k, v in os.environ.items() if k in keep}
    return {
        **env,
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
