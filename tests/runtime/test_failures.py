"""Failures while serving: an out-of-memory retries once in low-memory mode and says so; a device
error asks for a new worker (refresh_worker); a time limit stops the denoise loop and the worker
stays healthy; structured JSON log lines with per-phase timings; counts and percentiles in
describe's stats; settings validated. Faults are injected into the real UNet's forward (a hook
raising the error torch would raise), never by replacing the code under test."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REQ, decode_image


@pytest.fixture()
def fresh(home: Path, demo_artifact: Path, monkeypatch):
    """A service of its own (low-memory mode and hooks must not reach other tests' services)."""

    def make(**env: str):
        from runtime.service import Service, Settings

        for k, v in env.items():
            monkeypatch.setenv(k, v)
        return Service(Settings(artifacts=(str(demo_artifact),), home=home))

    return make


def _inject(svc, fault) -> object:
    """Calls fault(n) before each UNet forward (n counts from 1); returns the hook handle."""
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        fault(calls["n"])

    return svc.default.pipeline.unet.register_forward_pre_hook(hook)


def _stats(svc) -> dict:
    return svc.run({"describe": True})["stats"]


def test_out_of_memory_retries_once_in_low_memory_mode(fresh, demo_image):
    import torch

    svc = fresh()
    before = _stats(svc)

    def once(n: int) -> None:
        if n == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

    handle = _inject(svc, once)
    reply = svc.run(REQ)
    handle.remove()
    assert "images" in reply, reply
    assert any(
        w.startswith("out of memory on the first try; retried once with VAE tiling, VAE slicing, attention slicing")
        for w in reply["warnings"]
    ), reply["warnings"]
    assert svc.default.low_memory == ("VAE tiling", "VAE slicing", "attention slicing")
    assert svc.default.pipeline.vae.use_tiling and svc.default.pipeline.vae.use_slicing
    # Sliced attention and a (here untiled: 8x8 latents) VAE: the same picture within fp32 noise.
    got = decode_image(reply["images"][0]).astype(int)
    assert np.abs(got - demo_image.astype(int)).max() <= 2
    after = _stats(svc)
    assert after["ok"] == before["ok"] + 1

    def always(n: int) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    handle = _inject(svc, always)
    reply = svc.run(REQ)
    handle.remove()
    assert reply["error"].startswith("out of memory, also in low-memory mode") and "hint:" in reply["error"], reply
    assert "refresh_worker" not in reply, "an out-of-memory leaves the worker healthy"
    assert _stats(svc)["errors"].get("oom", 0) == before["errors"].get("oom", 0) + 1
    assert "images" in svc.run(REQ)


def test_a_device_error_asks_for_a_new_worker(fresh):
    svc = fresh()

    def broken(n: int) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    handle = _inject(svc, broken)
    reply = svc.run(REQ)
    handle.remove()
    assert reply["refresh_worker"] is True and reply["error"].startswith("the device failed: RuntimeError: CUDA error")
    assert _stats(svc)["errors"]["device"] >= 1


def test_a_time_limit_stops_the_denoise_loop_and_the_worker_stays_healthy(fresh, demo_image):
    svc = fresh(UIW_REQUEST_TIMEOUT="60")
    seen = {"n": 0}

    def slow(n: int) -> None:
        seen["n"] = n
        time.sleep(0.1)

    handle = _inject(svc, slow)
    t0 = time.monotonic()
    reply = svc.run({**REQ, "num_inference_steps": 50, "timeout": 0.5})
    took = time.monotonic() - t0
    handle.remove()
    assert reply["error"].startswith("timeout: the request ran past its 0.5 s limit (the request's timeout)"), reply
    assert "of 50" in reply["error"] and "hint:" in reply["error"]
    assert "refresh_worker" not in reply
    assert seen["n"] < 50, "the loop stopped early (one UNet call per step with this artifact's batched CFG)"
    assert took < 20
    # Healthy: the next request draws the usual image (no interrupt flag left on the shared pipeline).
    assert np.array_equal(decode_image(svc.run(REQ)["images"][0]), demo_image)

    too_long = svc.run({**REQ, "timeout": 61})
    assert too_long["errors"] == [
        "timeout: 61 s is more than this worker's limit of 60 s (UIW_REQUEST_TIMEOUT); "
        "send at most that, or leave it out"
    ]
    assert svc.run({**REQ, "timeout": "soon"})["errors"] == ["timeout: expected seconds greater than 0, got 'soon'"]
    assert svc.run({**REQ, "preview": 1})["errors"] == ["preview: expected true or false, got 1"]


def test_the_worker_limit_applies_without_a_request_timeout(fresh):
    svc = fresh(UIW_REQUEST_TIMEOUT="0.3")
    handle = _inject(svc, lambda n: time.sleep(0.1))
    reply = svc.run({**REQ, "num_inference_steps": 50})
    handle.remove()
    assert reply["error"].startswith("timeout: the request ran past its 0.3 s limit (UIW_REQUEST_TIMEOUT)"), reply


def test_bad_serving_settings_are_refused_with_the_reason(fresh, monkeypatch):
    from runtime.handler import concurrency_modifier, handler, start_config, stream_handler
    from runtime.settings import SettingError

    for name, value in (("UIW_REQUEST_TIMEOUT", "-1"), ("UIW_MAX_BATCH", "0"), ("UIW_BATCH_WINDOW_MS", "x")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(SettingError, match=f"{name}={value!r}: expected .* hint:"):
                fresh()
    monkeypatch.setenv("UIW_CONCURRENCY", "0")
    with pytest.raises(SettingError, match="UIW_CONCURRENCY='0': expected a whole number from 1 to 64"):
        start_config()
    monkeypatch.setenv("UIW_CONCURRENCY", "3")
    config = start_config()
    assert config["handler"] is handler and concurrency_modifier(1) == 3 and "return_aggregate_stream" not in config
    monkeypatch.setenv("UIW_STREAM", "1")
    config = start_config()
    assert config["handler"] is stream_handler and config["return_aggregate_stream"] is True


def test_log_lines_are_json_with_request_id_artifact_and_phases(service_env, caplog):
    from runtime.execute import RunContext
    from runtime.logs import JsonFormatter

    caplog.set_level(logging.INFO, logger="runtime.request")
    reply = service_env.run(REQ, RunContext(request_id="job-42", received=time.monotonic()))
    assert "images" in reply
    service_env.run({"prompt": "x", "width": 100}, RunContext(request_id="job-43"))
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records if r.name == "runtime.request"]
    ok, bad = lines[-2:]
    assert ok["request_id"] == "job-42" and ok["outcome"] == "ok" and ok["level"] == "info"
    assert ok["model"] == "demo" and ok["artifact"] == service_env.default.manifest.cache_key[:12]
    assert set(ok["seconds"]) == {"queue", "load", "inputs", "denoise", "decode", "encode", "total"}
    assert ok["seconds"]["total"] >= ok["seconds"]["denoise"] > 0
    assert ok["received_at"] <= ok["finished_at"]
    assert bad["request_id"] == "job-43" and bad["outcome"] == "error:invalid" and "multiple of 8" in bad["error"]
    assert bad["level"] == "warning"


def test_stats_count_outcomes_and_give_latency_percentiles():
    from runtime.metrics import Metrics

    m = Metrics(window=1000)
    for i in range(1, 101):
        m.record("ok", {"denoise": i / 1000, "total": i / 100})
    m.record("error:timeout", {"total": 5.0})
    m.record("error:invalid", {})
    snap = m.snapshot()
    assert snap["requests"] == 102 and snap["ok"] == 100 and snap["errors"] == {"invalid": 1, "timeout": 1}
    want = np.percentile(np.arange(1, 101), [50, 95, 99])  # numpy's linear interpolation, in ms
    d = snap["latency"]["denoise"]
    assert d["count"] == 100
    assert [d["p50_ms"], d["p95_ms"], d["p99_ms"]] == pytest.approx(list(want), abs=0.01)
    assert list(snap["latency"]) == ["denoise", "total"]  # phase order
    small = Metrics(window=10)
    for i in range(100):
        small.record("ok", {"total": float(i)})
    assert small.snapshot()["latency"]["total"]["count"] == 10, "a bounded window of recent requests"


def test_describe_carries_the_stats(call, service_env):
    call(REQ)
    stats = call({"describe": True})["stats"]
    assert stats["ok"] >= 1 and set(stats["latency"]) >= {"queue", "inputs", "denoise", "decode", "encode", "total"}
    assert all(set(v) == {"count", "p50_ms", "p95_ms", "p99_ms"} for v in stats["latency"].values())


def test_private_url_switch_takes_the_issue_name_and_the_old_one(monkeypatch):
    from runtime.settings import allow_private_urls as allow_private

    monkeypatch.delenv("UIW_ALLOW_PRIVATE_URLS", raising=False)
    monkeypatch.delenv("UIW_ALLOW_PRIVATE_IMAGE_URLS", raising=False)
    assert not allow_private()
    monkeypatch.setenv("UIW_ALLOW_PRIVATE_URLS", "1")
    assert allow_private()
    monkeypatch.delenv("UIW_ALLOW_PRIVATE_URLS")
    monkeypatch.setenv("UIW_ALLOW_PRIVATE_IMAGE_URLS", "1")
    assert allow_private()


def test_a_handler_error_reply_keeps_the_worker_serving(call):
    """The async handler answers a broken job with an error and goes on (no loop-bound state)."""
    from runtime.handler import handler

    assert "error" in asyncio.run(handler("not a job"))  # type: ignore[arg-type]
    assert "images" in call(REQ)


def _in_threads(*calls):
    """Runs each () -> value in its own thread, started 0.2 s apart; returns the values in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = []
        for i, c in enumerate(calls):
            if i:
                time.sleep(0.2)
            futures.append(pool.submit(c))
        return [f.result(timeout=60) for f in futures]


def test_a_batch_mates_time_limit_never_stops_another_request(fresh):
    """A request's own `timeout` keeps it out of batches; and when the worker's limit (counted
    from each job's arrival) cuts a batch short, the members whose own deadline had not passed
    run again on their own instead of failing."""
    from runtime.execute import RunContext

    svc = fresh(UIW_REQUEST_TIMEOUT="60", UIW_MAX_BATCH="4", UIW_BATCH_WINDOW_MS="300")
    handle = _inject(svc, lambda n: time.sleep(0.1))
    job = {**REQ, "num_inference_steps": 8}
    try:
        # The first request runs on its own (nobody else in flight); the next two arrive beside it.
        first, short, other = _in_threads(
            lambda: svc.run(job),
            lambda: svc.run({**job, "seed": 8, "timeout": 0.5}),
            lambda: svc.run({**job, "seed": 9}),
        )
        assert "images" in first, first
        assert short["error"].startswith("timeout: the request ran past its 0.5 s limit (the request's timeout)")
        assert "images" in other, f"stopped by a batch-mate's timeout: {other}"
        # The worker's limit, from arrival: one job arrived 59.5 s ago, the other now.
        late = RunContext(received=time.monotonic() - 59.5)
        first, old, new = _in_threads(
            lambda: svc.run(job),
            lambda: svc.run({**job, "seed": 8}, late),
            lambda: svc.run({**job, "seed": 9}),
        )
        assert "images" in first, first
        assert old["error"].startswith("timeout: the request ran past its 60 s limit (UIW_REQUEST_TIMEOUT)"), old
        assert "images" in new, f"stopped by a batch-mate's deadline: {new}"
    finally:
        handle.remove()


def test_a_request_beside_another_kind_never_waits_the_batch_window(fresh):
    svc = fresh(UIW_MAX_BATCH="4", UIW_BATCH_WINDOW_MS="3000")
    handle = _inject(svc, lambda n: time.sleep(0.1))

    def timed(job):
        t0 = time.monotonic()
        return svc.run(job), time.monotonic() - t0

    try:
        (slow, _), (quick, took) = _in_threads(
            lambda: timed({**REQ, "num_inference_steps": 12}), lambda: timed({**REQ, "num_inference_steps": 2})
        )
    finally:
        handle.remove()
    assert "images" in slow and "images" in quick
    assert took < 2.5, f"{took:.2f} s: waited the 3 s window for batch-mates of another batch key"


def _overlap_probe(svc):
    """A UNet hook: the first forward of each request waits up to 1 s for another request's
    forward; returns the list of (thread, other thread) overlaps seen, and the hook handle."""
    inside: dict[int, int] = {}
    overlaps: list[tuple[int, int]] = []
    lock = threading.Condition()

    def hook(module, args):
        me = threading.get_ident()
        with lock:
            first = me not in inside
            inside[me] = inside.get(me, 0) + 1
            others = [t for t in inside if t != me]
            overlaps.extend((me, t) for t in others)
            lock.notify_all()
            if first:
                lock.wait_for(lambda: any(t != me for t in inside), timeout=1.0)
                overlaps.extend((me, t) for t in inside if t != me and t not in others)

    return overlaps, svc.default.pipeline.unet.register_forward_pre_hook(hook), inside


def test_low_memory_generations_of_an_artifact_take_turns(fresh):
    """Offload hooks (re-installed by every diffusers call's maybe_free_model_hooks) and the
    low-memory switch act on the shared modules: such an artifact runs one generation at a time."""
    svc = fresh(UIW_MAX_BATCH="1")
    assert svc.run(REQ) and svc.default.enable_low_memory()
    overlaps, handle, inside = _overlap_probe(svc)

    def job(seed):
        def run():
            # Each request's UNet calls are one thread's: clear this thread's mark when it ends.
            try:
                return svc.run({**REQ, "seed": seed})
            finally:
                inside.pop(threading.get_ident(), None)

        return run

    try:
        a, b = _in_threads(job(1), job(2))
    finally:
        handle.remove()
    assert "images" in a and "images" in b
    assert not overlaps, "two generations of a low-memory artifact ran at once"


def test_enable_low_memory_waits_for_running_generations(fresh):
    svc = fresh(UIW_MAX_BATCH="1")
    entered, release = threading.Event(), threading.Event()

    def block(n: int) -> None:
        if n == 1:
            entered.set()
            release.wait(10)

    handle = _inject(svc, block)
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(svc.run, REQ)
            assert entered.wait(30)
            switching = pool.submit(svc.default.enable_low_memory)
            time.sleep(0.3)
            assert not switching.done() and svc.default.low_memory == (), "switched under a running generation"
            release.set()
            assert switching.result(timeout=30) == ("VAE tiling", "VAE slicing", "attention slicing")
            assert "images" in running.result(timeout=30)
    finally:
        release.set()
        handle.remove()


@pytest.mark.parametrize("offload", ["none", "model"])
def test_a_load_with_offload_leaves_placing_the_modules_to_the_hooks(demo_artifact, monkeypatch, offload):
    """Offload hooks place each module on the device when it runs: load() must not first move the
    whole pipeline there (the memory offload is there to save). Checked on the CPU by loading
    for "cuda" with the device move and runtime.optimize recorded instead of run."""
    import diffusers

    import runtime.optimize
    from runtime import loader

    read = loader.read_manifest

    def with_offload(path):
        manifest = read(path)
        return manifest.model_copy(update={"runtime": manifest.runtime.model_copy(update={"offload": offload})})

    moved: list[tuple] = []
    applied: list[str] = []
    monkeypatch.setattr(loader, "read_manifest", with_offload)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "to", lambda self, *a, **k: (a and moved.append(a)) or self)
    monkeypatch.setattr(runtime.optimize, "apply", lambda pipe, options, device, path: applied.append(options.offload))
    loaded = loader.load(demo_artifact, device="cuda")
    assert applied == [offload]
    assert moved == ([] if offload == "model" else [("cuda",)])
    assert loaded.takes_turns == (offload == "model"), "offloaded generations take turns"
