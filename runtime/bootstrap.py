"""The environment's model, compiled at worker start, then served.

The runtime never imports the compiler: the recipe (runtime.envrecipe) is compiled by a child
process, ``python -m compiler recipe=NAME recipes_dir=<private folder> home=<the store>``, in a
thread, while the worker already takes jobs. A job arriving meanwhile waits for the build, and
hears about it through the handler's progress channel (``{"status": "building", ...}`` events);
then the service is created with the built artifact as its default model, before the jobs it held
run. A build that fails answers every job with the compiler's message; the worker stays up (a
new worker would fail the same way).

Several workers on one store (a network volume): the compiler's build lock (a file lock under
``<home>/locks/``) makes one of them build; the others wait on it, then find the artifact and
load it. A worker killed mid-build leaves a staging folder, never a finished-looking artifact
(READY is written last, in a folder renamed into place), and the next build under the lock
removes it and builds again. The child dies with its worker (PR_SET_PDEATHSIG), so a killed
worker's compile does not linger holding the lock.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from runtime.envrecipe import recipe_text
from runtime.settings import SettingError, Settings, WorkerSettings, volume

log = logging.getLogger("runtime.build")

Report = Callable[[dict[str, Any]], None]
PR_SET_PDEATHSIG = 1
KEEP_LINES = 40  # the compiler's last stderr lines kept for an error reply
# Set by the loader in this process (it never reaches the Hub); the compiler must, unless the
# user turned it on (runtime.loader.OFFLINE_BY_US).
CHILD_DROPS = ("HF_HUB_OFFLINE",)


def _death_signal() -> Callable[[], Any] | None:
    """A function for the child, between fork and exec, that makes the kernel kill it when its
    worker dies (Linux's prctl; looked up here, in the parent: the child only calls it)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the child may outlive a killed worker
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Bootstrap:
    """One build of the environment's model and the service made from it."""

    def __init__(self, worker: WorkerSettings, env: dict[str, str] | None = None):
        assert worker.model is not None
        self.spec = worker.model
        self.settings = worker.service
        self.env = dict(os.environ if env is None else env)
        self.started = time.monotonic()
        self.stage = "starting the compiler"
        self.error: str | None = None
        self.artifact: Path | None = None
        self.done = threading.Event()
        self._lines: list[str] = []

    def start(self) -> Bootstrap:
        threading.Thread(target=self._run, name="bootstrap", daemon=True).start()
        return self

    def _run(self) -> None:
        from runtime.service import get_service

        try:
            self.artifact = self._compile()
            served = (str(self.artifact), *self.settings.artifacts)
            get_service(replace(self.settings, artifacts=served))  # preloads the default: the new model
            log.info("serving %s from %s (%.1f s after start)", self.spec.name, self.artifact, self.elapsed())
        except Exception as e:  # every job gets the reason; the worker stays up
            self.error = str(e) if isinstance(e, SettingError | BuildFailed) else f"{type(e).__name__}: {e}"
            log.error("the model could not be served: %s", self.error)
        finally:
            self.done.set()

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def command(self, recipes: Path) -> list[str]:
        argv = [sys.executable, "-m", "compiler", f"recipe={self.spec.name}", f"recipes_dir={recipes}"]
        argv.append(f"home={self.settings.home}")
        if self.spec.precision is not None:
            argv.append(f"precision={self.spec.precision}")
        return argv

    def child_env(self) -> dict[str, str]:
        from runtime.loader import OFFLINE_BY_US

        env = {k: v for k, v in self.env.items() if not (k in CHILD_DROPS and OFFLINE_BY_US)}
        mounted = volume(self.env)
        if mounted is not None and "HF_HOME" not in self.env:
            env["HF_HOME"] = str(mounted / "huggingface")  # downloads cached on the volume too
        return env

    def _compile(self) -> Path:
        text = recipe_text(self.spec, volume(self.env), self.env)
        with tempfile.TemporaryDirectory(prefix="uiw-recipe-") as folder:
            recipes = Path(folder)
            (recipes / f"{self.spec.name}.yaml").write_text(text)
            log.info("compiling %s into %s", self.spec.name, self.settings.home)
            proc = subprocess.Popen(
                self.command(recipes),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=self.child_env(),
                preexec_fn=_death_signal(),
            )
            assert proc.stderr is not None and proc.stdout is not None
            for line in proc.stderr:  # the compiler's log: forwarded, and the latest is the stage
                line = line.rstrip()
                if line:
                    self.stage = line[-300:]
                    self._lines = [*self._lines[-KEEP_LINES + 1 :], line]
                    log.info("compiler: %s", line)
            out = proc.stdout.read().strip()
            code = proc.wait()
        if code != 0 or not out:
            raise BuildFailed(self.spec.name, code, self._lines)
        return Path(out.splitlines()[-1])

    def event(self) -> dict[str, Any]:
        """What a waiting job hears: the build's latest compiler log line and time so far."""
        elapsed = round(self.elapsed(), 1)
        return {"status": "building", "model": self.spec.name, "elapsed_s": elapsed, "stage": self.stage}

    def wait(self, report: Report | None, interval_s: float) -> str | None:
        """Block until the model serves (None) or cannot (the error), reporting the build's stage
        every ``interval_s`` seconds meanwhile."""
        while not self.done.wait(timeout=max(interval_s, 0.2) if report is not None else None):
            if report is not None:
                report(self.event())
        return self.error


class BuildFailed(Exception):
    def __init__(self, name: str, code: int, lines: list[str]):
        errors = [line for line in lines if line.startswith("error:") or line.startswith("  ")]
        detail = "\n".join(errors or lines[-5:]) or "no output"
        super().__init__(
            f"the model {name!r} (UIW_MODEL / UIW_RECIPE) could not be built (compiler exit {code}):\n{detail}\n"
            "hint: fix the variable in the endpoint's template and restart the workers; the worker log has the "
            "compiler's whole output"
        )


current: Bootstrap | None = None


def start(worker: WorkerSettings) -> Bootstrap | None:
    """Start the environment's build (when it names a model); the handler waits on it."""
    global current
    current = Bootstrap(worker).start() if worker.model is not None else None
    return current


def wait(report: Report | None = None, interval_s: float = 1.0) -> str | None:
    """None once the service can be used (at once without an environment model), else the error."""
    return None if current is None else current.wait(report, interval_s)


def prefer_image(settings: Settings, image_home: Path | None) -> Settings:
    """Served recipe names that the image's own store holds are served from it (baked into the
    image: no volume read), the others from the home."""
    if image_home is None:
        return settings
    from runtime.artifact import ArtifactError, resolve_artifact

    entries = []
    for entry in settings.artifacts:
        try:
            is_path = os.sep in entry or entry.startswith(".") or Path(entry).expanduser().is_dir()
            entries.append(entry if is_path else str(resolve_artifact(entry, image_home)))
        except ArtifactError:
            entries.append(entry)
    return replace(settings, artifacts=tuple(entries))
