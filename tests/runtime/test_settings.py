"""runtime.settings: every UIW_*/BUCKET_* setting of the worker parsed in one place, into one
frozen value at start, a bad value refused with the variable's name and a hint."""

from __future__ import annotations

import ast
import dataclasses
import os
from pathlib import Path

import pytest

from runtime.settings import (
    BatchSettings,
    Bucket,
    ExecSettings,
    SettingError,
    Settings,
    WorkerSettings,
    bucket,
)
from runtime.threads import Cores

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
CORES = Cores(6, "cgroup v2 cpu.max")


def _setting_reads(source: str) -> list[int]:
    """Lines of a module that read a UIW_/BUCKET_ variable by its literal name (``x.get("UIW_...")``,
    ``x["UIW_..."]``, ``os.getenv("UIW_...")``, ``"UIW_..." in x``) or name one in a module
    constant (``ENDPOINT_ENV = "BUCKET_ENDPOINT_URL"``, read through the constant)."""

    def named(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.startswith(("UIW_", "BUCKET_"))
        )

    tree = ast.parse(source)
    found = [n.lineno for n in tree.body if isinstance(n, ast.Assign | ast.AnnAssign) and n.value and named(n.value)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            lookup = isinstance(func, ast.Attribute) and func.attr in ("get", "getenv", "pop", "setdefault")
            hit = lookup and bool(node.args) and named(node.args[0])
        elif isinstance(node, ast.Subscript):
            hit = named(node.slice)
        elif isinstance(node, ast.Compare):
            hit = named(node.left) and isinstance(node.ops[0], ast.In | ast.NotIn)
        else:
            hit = False
        if hit:
            found.append(node.lineno)
    return sorted(found)


def test_the_read_finder_finds_each_form_of_read():
    source = (
        'import os\nENDPOINT_ENV = "BUCKET_ENDPOINT_URL"\nLABEL = "timeout"\n'
        'a = os.environ.get("UIW_A", "")\nb = os.getenv("UIW_B")\nc = env["UIW_C"]\nd = "UIW_D" in env\n'
        'e = os.environ.get("HOME")\nf = deadline("UIW_REQUEST_TIMEOUT")\n'
    )
    assert _setting_reads(source) == [2, 4, 5, 6, 7]


def test_only_the_settings_module_reads_worker_settings():
    assert _setting_reads((RUNTIME / "settings.py").read_text())  # it reads them, through the same forms
    elsewhere = {
        p.name: lines
        for p in sorted(RUNTIME.glob("*.py"))
        if p.name != "settings.py" and (lines := _setting_reads(p.read_text()))
    }
    assert elsewhere == {}


def test_an_environment_parses_into_one_frozen_value(tmp_path: Path):
    env = {
        "UIW_ARTIFACTS": " a, ./b ,,fox ",
        "UIW_HOME": str(tmp_path),
        "UIW_MEMORY_BUDGET": "1.5GB",
        "UIW_PRELOAD": "all",
        "UIW_ROUTING_SEED": "7",
        "UIW_REQUEST_TIMEOUT": "0",
        "UIW_PREVIEW": "yes",
        "UIW_MAX_BATCH": "1",
        "UIW_BATCH_WINDOW_MS": "250",
        "UIW_CONCURRENCY": "3",
        "UIW_STREAM": "TRUE",
        "UIW_PROGRESS_INTERVAL": "0.25",
        "UIW_THREADS": "2",
        "OMP_NUM_THREADS": "4",
        "UIW_LOG_FORMAT": "Text",
        "UIW_LOG_LEVEL": "DEBUG",
        "UIW_VERIFY": "full",
    }
    expected = WorkerSettings(
        service=Settings(
            artifacts=("a", "./b", "fox"),
            home=tmp_path,
            memory_budget=1_500_000_000,
            preload="all",
            routing_seed=7,
            execution=ExecSettings(request_timeout_s=None, preview=True, batch=BatchSettings(1, 0.25)),
        ),
        concurrency=3,
        stream=True,
        progress_interval_s=0.25,
        threads=2,
        omp_num_threads="4",
        log_format="text",
        log_level="DEBUG",
        verify="full",
    )
    parsed = WorkerSettings.from_env(CORES, env)
    assert parsed == expected
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.concurrency = 4  # type: ignore[misc]


def test_an_empty_environment_gives_the_documented_defaults():
    parsed = WorkerSettings.from_env(CORES, {})
    assert parsed.service.artifacts == () and parsed.service.home == Path("~/.cache/uiw").expanduser()
    assert (parsed.service.memory_budget, parsed.service.preload, parsed.service.routing_seed) == (None, "1", None)
    assert parsed.service.execution == ExecSettings(600.0, False, BatchSettings(4, 0.02))
    assert (parsed.concurrency, parsed.stream, parsed.progress_interval_s, parsed.threads) == (1, False, 1.0, None)
    assert (parsed.log_format, parsed.log_level, parsed.verify) == ("json", "INFO", "memo")


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("UIW_MEMORY_BUDGET", "lots", "not a memory size"),
        ("UIW_ROUTING_SEED", "-1", "not a whole number"),
        ("UIW_REQUEST_TIMEOUT", "nan", "expected seconds from 0"),
        ("UIW_REQUEST_TIMEOUT", "86401", "expected seconds from 0"),
        ("UIW_MAX_BATCH", "17", "from 1 to 16"),
        ("UIW_MAX_BATCH", "+4", "from 1 to 16"),
        ("UIW_BATCH_WINDOW_MS", "0.5", "from 0 to 10000"),
        ("UIW_CONCURRENCY", "²", "from 1 to 64"),  # a digit to str.isdigit, not to int()
        ("UIW_PROGRESS_INTERVAL", "inf", "0 or more"),
        ("UIW_THREADS", "1025", "(6 here, cgroup v2 cpu.max)"),
        ("UIW_LOG_FORMAT", "xml", "one of json, text"),
        ("UIW_LOG_LEVEL", "info", "level name"),
        ("UIW_VERIFY", "paranoid", "not one of memo, full, off"),
    ],
)
def test_each_bad_value_names_its_variable_with_a_hint(name: str, value: str, says: str):
    with pytest.raises(SettingError) as caught:
        WorkerSettings.from_env(CORES, {name: value})
    message = str(caught.value)
    assert message.startswith(name) and repr(value) in message and says in message, message
    assert "hint: " in message, message


def test_settings_built_in_code_take_execution_from_the_environment(monkeypatch, tmp_path: Path):
    """What the service used to read itself at construction, a direct Settings still follows."""
    monkeypatch.setenv("UIW_REQUEST_TIMEOUT", "12")
    monkeypatch.setenv("UIW_MAX_BATCH", "2")
    assert Settings(artifacts=("x",), home=tmp_path).execution == ExecSettings(12.0, False, BatchSettings(2, 0.02))
    monkeypatch.setenv("UIW_MAX_BATCH", "0")
    with pytest.raises(SettingError, match="UIW_MAX_BATCH='0'"):
        Settings(artifacts=("x",), home=tmp_path)


def test_bucket_configuration():
    keys = {"BUCKET_ACCESS_KEY_ID": "id", "BUCKET_SECRET_ACCESS_KEY": "secret"}
    assert bucket({}) is None
    got = bucket({"BUCKET_ENDPOINT_URL": "https://s3.eu-west-2.amazonaws.com/", **keys})
    assert got == Bucket("https://s3.eu-west-2.amazonaws.com", "id", "secret", None, "eu-west-2")
    assert "secret" not in repr(got)
    named = bucket({"BUCKET_ENDPOINT_URL": "https://ams3.digitaloceanspaces.com", "BUCKET_NAME": " b ", **keys})
    assert named is not None and (named.bucket_name(), named.region) == ("b", "ams3")
    for env, says in (
        (keys, "BUCKET_ENDPOINT_URL is not"),
        ({"BUCKET_ENDPOINT_URL": "https://x.example", "BUCKET_ACCESS_KEY_ID": "id"}, "BUCKET_SECRET_ACCESS_KEY is"),
        ({"BUCKET_ENDPOINT_URL": "s3.example.com", **keys}, "not an http(s) URL"),
    ):
        with pytest.raises(SettingError, match="hint: ") as caught:
            bucket(env)
        assert says in str(caught.value)


@pytest.mark.parametrize(("name", "value"), [("UIW_VERIFY", "paranoid"), ("UIW_LOG_LEVEL", "loud")])
def test_settings_checked_only_at_load_or_logging_now_stop_the_worker_at_start(
    demo_artifact: Path, home: Path, name: str, value: str
):
    """UIW_VERIFY used to fail each load (the worker started and answered every job with the
    error); a bad UIW_LOG_LEVEL stopped it with logging's own message, naming neither the variable
    nor a fix. Both now stop the worker at start, naming the variable, with a hint."""
    from tests.conftest import LEAKY
    from tests.helpers.devserver import refused_start

    env = {k: v for k, v in os.environ.items() if k not in LEAKY and not k.startswith("UIW_")}
    env.update({"UIW_HOME": str(home), "UIW_ARTIFACTS": str(demo_artifact), "UIW_PRELOAD": "0", name: value})
    proc = refused_start(env, f"{name}={value!r}")
    assert name in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
