"""Concurrency without shared mutable state.

- The split of a generation into denoise (to latents) and decode (outside any LoRA gate) draws
  exactly what the pipeline's own call draws, for each family's tail we mirror.
- The LoRA gate (runtime.gate.ModeGate): same set together, other sets exclusive, in order.
- Over real HTTP against the SDK's dev server, with an artifact holding two switchable LoRAs:
  concurrent requests with different LoRAs and seeds give the same images as the same requests
  one at a time - exactly without batching, within BATCH_TOLERANCE with it - and jobs overlap in
  time (from the worker's own log lines: arrival and end per request). The throughput ratio
  concurrent/sequential is printed (bench/RESULTS.md "Serving concurrency" has the numbers).
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.compiler.test_lora import RECIPE, _factors, base, kohya_file  # noqa: F401  (fixture)
from tests.conftest import compile_text
from tests.helpers.devserver import dev_server, post

# Batched CPU matmuls need not be bit-identical to unbatched ones (other blocking); measured here
# at 64x64 the batched images were identical (max difference 0), the bound allows 2/255.
BATCH_TOLERANCE = 2

JOBS = [
    {"prompt": "a red fox in the snow", "seed": 1, "loras": [{"name": "a"}]},
    {"prompt": "a red fox in the snow", "seed": 2, "loras": [{"name": "a"}]},
    {"prompt": "a blue bird on a wire", "seed": 3, "loras": [{"name": "b"}]},
    {"prompt": "a blue bird on a wire", "seed": 4},
    {"prompt": "a green tree by a lake", "seed": 5},
    {"prompt": "a green tree by a lake", "seed": 6, "loras": [{"name": "a", "scale": 0.3}, {"name": "b"}]},
]
# The first request of a batch key runs at once (nobody of its key in flight to wait for); the
# ones of its key arriving while it runs batch together: three of a key make one batch of two.
BATCH_JOBS = [*JOBS, {"prompt": "a yellow duck in a pond", "seed": 7, "loras": [{"name": "a"}]}]


# One compute thread per request in the worker: with PyTorch's default (one per core) a lone
# request on a busy 2-core machine runs ~20x slower (bench/RESULTS.md "Serving concurrency"),
# which would make the sequential half of these tests take minutes and the ratio meaningless.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _pixels(data_uri: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_uri.partition(",")[2]))), dtype=int)


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl", "tiny-flux"])
def test_denoise_then_decode_draws_what_the_pipeline_draws(name: str):
    import diffusers
    import torch

    from compiler.tiny_models import BUILTINS
    from runtime.artifact import SCHEDULERS
    from runtime.generate import call_arguments, decode_kind, generate
    from tests.helpers.generation import tiny_request

    pipe = BUILTINS[name].build()
    pipe.set_progress_bar_config(disable=True)
    scheduler = "FLOW_MATCH_EULER" if name == "tiny-flux" else "K_EULER"
    negative = None if name == "tiny-flux" else "blurry"
    request = tiny_request(negative_prompt=negative, scheduler=scheduler, seed=3, num_images=2)
    assert decode_kind(pipe) is not None  # the decode under test is ours, not the pipeline's
    ours = generate(pipe, request)
    # Plain diffusers: the same components, the pipeline's own decode (output_type="pil").
    ref = type(pipe)(**pipe.components)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    want = ref(**call_arguments(pipe, request), generator=torch.Generator("cpu").manual_seed(3)).images
    assert len(ours) == len(want) == 2
    for a, b in zip(ours, want, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_the_lora_gate_runs_one_set_together_and_other_sets_alone():
    from runtime.gate import ModeGate

    switches: list[object] = []
    gate = ModeGate(switches.append)
    inside: dict[str, int] = {}
    peak: dict[str, int] = {}
    lock = threading.Lock()
    log: list[tuple[str, str]] = []

    def job(mode: str, hold: float) -> None:
        with gate.hold(mode):
            with lock:
                inside[mode] = inside.get(mode, 0) + 1
                peak[mode] = max(peak.get(mode, 0), sum(inside.values()))
                others = [m for m, n in inside.items() if m != mode and n]
                log.append((mode, ",".join(others)))
            time.sleep(hold)
            with lock:
                inside[mode] -= 1

    threads = [threading.Thread(target=job, args=(m, 0.2)) for m in ("x", "x", "x")]
    threads += [threading.Thread(target=job, args=("y", 0.05))]
    for t in threads:
        t.start()
        time.sleep(0.01)  # arrival order: x, x, x, y
    for t in threads:
        t.join(timeout=10)
    assert all(others == "" for _, others in log), "another set was never inside with one"
    assert peak["x"] == 3, "the same set runs together"
    assert switches == ["x", "y"], "switched once per change of set, in arrival order"


def _two_lora_artifact(tmp: Path, base) -> Path:  # noqa: F811
    (tmp / "recipes").mkdir()
    kohya_file(tmp / "recipes" / "a.safetensors", _factors(base, 1), alpha=2.0)
    kohya_file(tmp / "recipes" / "b.safetensors", _factors(base, 2), alpha=4.0)
    loras = (
        "  - source: ./a.safetensors\n    scale: 0.8\n    fuse: false\n    name: a\n"
        "  - source: ./b.safetensors\n    scale: 0.6\n    fuse: false\n    name: b"
    )
    proc = compile_text(tmp, "two", RECIPE.format(loras=loras))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Path(proc.stdout.strip())


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory: pytest.TempPathFactory, base) -> tuple[Path, Path]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("two-loras")
    return tmp / "home", _two_lora_artifact(tmp, base)


def _runsync(url: str, job: dict) -> dict:
    out = post(f"{url}/runsync", {"input": job})
    assert out["status"] == "COMPLETED", out
    return out["output"]


def _serve_both_ways(url: str, jobs: list[dict] = JOBS) -> tuple[list[dict], list[dict], float, float]:
    _runsync(url, {"prompt": "warm-up", "seed": 0})
    t0 = time.perf_counter()
    sequential = [_runsync(url, job) for job in jobs]
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        concurrent = list(pool.map(lambda job: _runsync(url, job), jobs))
    return sequential, concurrent, t_seq, time.perf_counter() - t0


def _overlaps(lines: list[dict]) -> int:
    spans = [(r["received_at"], r["finished_at"]) for r in lines]
    return sum(1 for i, a in enumerate(spans) for b in spans[i + 1 :] if max(a[0], b[0]) < min(a[1], b[1]))


def test_concurrent_requests_with_different_loras_draw_what_sequential_ones_draw(two_loras, tmp_path: Path):
    home, artifact = two_loras
    env = {"UIW_HOME": str(home), "UIW_ARTIFACTS": str(artifact), "UIW_MAX_BATCH": "1", **ONE_THREAD}
    with dev_server(env, tmp_path) as server:
        sequential, concurrent, t_seq, t_conc = _serve_both_ways(server.url)
        done = server.requests_done()
    for job, a, b in zip(JOBS, sequential, concurrent, strict=True):
        assert a["images"] == b["images"], f"{job}: not the same bytes when run concurrently"
    # The LoRAs were applied: the same seed and prompt with and without one differ.
    assert len({s["images"][0] for s in sequential}) == len(JOBS)
    conc = done[-len(JOBS) :]
    assert all(r["outcome"] == "ok" for r in conc) and {r["request_id"][:5] for r in conc} == {"test-"}
    spans = [(r["received_at"], r["finished_at"]) for r in conc]
    assert _overlaps(conc) >= 1, f"no two jobs overlapped in time: {spans}"
    print(
        json.dumps(
            {
                "batching": False,
                "jobs": len(JOBS),
                "sequential_s": round(t_seq, 2),
                "concurrent_s": round(t_conc, 2),
                "throughput_ratio": round(t_seq / t_conc, 3),
                "overlapping_pairs": _overlaps(conc),
            }
        )
    )


def test_batched_concurrent_requests_match_sequential_within_tolerance(two_loras, tmp_path: Path):
    home, artifact = two_loras
    env = {
        "UIW_HOME": str(home),
        "UIW_ARTIFACTS": str(artifact),
        "UIW_MAX_BATCH": "4",
        "UIW_BATCH_WINDOW_MS": "500",
        **ONE_THREAD,
    }
    with dev_server(env, tmp_path) as server:
        sequential, concurrent, t_seq, t_conc = _serve_both_ways(server.url, BATCH_JOBS)
        done = server.requests_done()
    worst = 0
    for a, b in zip(sequential, concurrent, strict=True):
        worst = max(worst, int(np.abs(_pixels(a["images"][0]) - _pixels(b["images"][0])).max()))
    assert worst <= BATCH_TOLERANCE, worst
    conc = done[-len(BATCH_JOBS) :]
    assert not any("batch" in r for r in done[: -len(BATCH_JOBS)]), "a lone request never waits for a batch"
    batched = [r for r in conc if r.get("batch", 1) > 1]
    assert batched, "compatible requests (same LoRA set, size, steps) ran as one call"
    print(
        json.dumps(
            {
                "batching": True,
                "jobs": len(BATCH_JOBS),
                "batched_requests": len(batched),
                "sequential_s": round(t_seq, 2),
                "concurrent_s": round(t_conc, 2),
                "throughput_ratio": round(t_seq / t_conc, 3),
                "max_abs_diff_255": worst,
            }
        )
    )


def test_the_batcher_groups_by_key_within_the_window_and_shares_errors():
    from runtime.batching import Batcher
    from runtime.settings import BatchSettings

    calls: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        calls.append(list(items))
        if "boom" in items:
            raise RuntimeError("injected")
        return [i.upper() for i in items]

    batcher: Batcher[str, str] = Batcher(BatchSettings(max_batch=3, window_s=0.5), run)
    assert not hasattr(Batcher, "alone") and "alone" not in Batcher.submit.__code__.co_varnames
    t0 = time.monotonic()
    assert batcher.submit(None, "solo") == ("SOLO", 1) and calls == [["solo"]], "no key: at once, on its own"
    assert time.monotonic() - t0 < 0.4, "no window without a key"
    calls.clear()
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(batcher.submit, key, item) for key, item in (("k", "a"), ("k", "b"), ("j", "c"), ("k", "d"))
        ]
        results = [f.result(timeout=10) for f in futures]
    assert results == [("A", 3), ("B", 3), ("C", 1), ("D", 3)]
    assert sorted(map(sorted, calls)) == [["a", "b", "d"], ["c"]], "one call per key; full at 3"
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(batcher.submit, "k", item) for item in ("x", "boom")]
        errors = [f.exception(timeout=10) for f in futures]
    assert all(isinstance(e, RuntimeError) and str(e) == "injected" for e in errors), "every member hears of it"


@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
@pytest.mark.parametrize("negative", [None, "blurry"])
def test_a_batched_denoise_draws_what_each_solo_call_draws(name: str, negative: str | None):
    """SDXL reads a missing negative prompt as zero embeddings (force_zeros_for_empty_prompt),
    not as "": requests with and without one never share a call, and a batch without any passes
    None, so each image is its solo image."""
    from compiler.tiny_models import BUILTINS
    from runtime.generate import batch_key, decode, denoise, generate
    from runtime.schema import GenerationRequest
    from tests.helpers.generation import tiny_request

    pipe = BUILTINS[name].build()
    pipe.set_progress_bar_config(disable=True)

    def request(prompt: str, seed: int, negative_prompt: str | None) -> GenerationRequest:
        return tiny_request(prompt=prompt, negative_prompt=negative_prompt, seed=seed)

    requests = [request("a red fox in the snow", 1, negative), request("a blue bird on a wire", 2, negative)]
    assert batch_key(requests[0]) == batch_key(requests[1]) is not None
    batched = [decode(pipe, d, r)[0] for d, r in zip(denoise(pipe, requests), requests, strict=True)]
    for r, got in zip(requests, batched, strict=True):
        (want,) = generate(pipe, r)
        worst = int(np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max())
        assert worst <= BATCH_TOLERANCE, f"{name}, negative_prompt={negative!r}: {worst}/255 off its solo image"
    assert batch_key(request("x", 3, None)) != batch_key(request("x", 3, "")), "None and '' never batch together"


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_sdxl_image_tasks_hold_the_upcast_lock_while_their_fp16_vae_encodes(task: str):
    """SDXL img2img/inpaint cast a force_upcast fp16 VAE to fp32 and back inside their own call
    (prepare_latents): that denoise holds the VAE's upcast lock, as our decode does."""
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline
    from PIL import Image

    from compiler.tiny_models import BUILTINS
    from runtime.generate import _upcast_lock, denoise
    from tests.helpers.generation import tiny_request

    base_pipe = BUILTINS["tiny-sdxl"].build()
    cls = StableDiffusionXLImg2ImgPipeline if task == "img2img" else StableDiffusionXLInpaintPipeline
    pipe = cls.from_pipe(base_pipe)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.to(dtype=torch.float16)
    assert pipe.vae.config.force_upcast
    held: list[bool] = []
    handle = pipe.vae.encoder.register_forward_pre_hook(lambda m, a: held.append(_upcast_lock(pipe.vae).locked()))
    request = tiny_request(
        task=task,
        strength=0.75,
        image=Image.new("RGB", (64, 64), (200, 30, 30)),
        mask=Image.new("L", (64, 64), 255) if task == "inpaint" else None,
    )
    try:
        denoise(pipe, [request])
    finally:
        handle.remove()
    assert held and all(held), f"the VAE encoded outside its upcast lock: {held}"
