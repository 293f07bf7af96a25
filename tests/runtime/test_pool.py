"""runtime.pool: budget parsing and defaults, LRU eviction, leases, one load for concurrent
requests, memory returned after eviction, and the footprint of a real loaded artifact."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from runtime.artifact import FileEntry, Manifest, read_manifest
from runtime.pool import Pool, PoolError, default_budget, estimate_bytes, measured_bytes
from runtime.settings import SettingError
from runtime.settings import memory_budget as parse_budget

UNIT = 64  # a fake artifact: one UNIT x UNIT fp32 Linear, 16 KiB, and a weight file of that size
UNIT_BYTES = 4 * UNIT * UNIT


@pytest.mark.parametrize(
    "text, expected",
    [("8GiB", 8 * 2**30), ("500MB", 500 * 10**6), ("1.5GB", 1_500_000_000), ("123", 123), (" 2 kib ", 2048)],
)
def test_budget_units(text: str, expected: int):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["lots", "0", "-1", "8 parsecs", ""])
def test_bad_budget_is_a_clear_error_at_start(text: str, monkeypatch: pytest.MonkeyPatch):
    from runtime.service import Settings

    with pytest.raises(SettingError, match=r"UIW_MEMORY_BUDGET.*hint:"):
        parse_budget(text)
    if text.strip():
        monkeypatch.setenv("UIW_MEMORY_BUDGET", text)
        with pytest.raises(SettingError, match="UIW_MEMORY_BUDGET"):
            Settings.from_env()


def test_default_budget_on_cpu_is_a_share_of_available_ram():
    import psutil

    budget, how = default_budget()
    assert not torch.cuda.is_available()
    assert 0 < budget < psutil.virtual_memory().total and "available RAM" in how


@dataclass
class FakeLoaded:
    """What the pool reads of runtime.loader.Loaded: the components (real torch modules, so that
    the measurement is the real one) and the ControlNets."""

    manifest: Manifest
    pipeline: Any = None
    controlnets: dict[str, Any] = field(default_factory=dict)


class Loader:
    def __init__(self, manifests: dict[Path, Manifest], delay: float = 0.0, fail: bool = False):
        self.manifests, self.delay, self.fail = manifests, delay, fail
        self.calls: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> FakeLoaded:
        with self._lock:
            self.calls.append(path.name)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("disk on fire")
        pipe = type("Pipe", (), {})()
        pipe.components = {"unet": torch.nn.Linear(UNIT, UNIT, bias=False), "tokenizer": object()}
        return FakeLoaded(self.manifests[path], pipe)


@pytest.fixture(scope="module")
def base_manifest(demo_artifact: Path) -> Manifest:
    return read_manifest(demo_artifact)


def fakes(base: Manifest, *names: str, units: int = 1) -> dict[Path, Manifest]:
    """Manifests whose weight files add up to UNIT_BYTES each (plus a config the estimate skips)."""
    files = (
        FileEntry(path="pipeline/unet/model.safetensors", sha256="0" * 64, size=UNIT_BYTES * units),
        FileEntry(path="pipeline/unet/config.json", sha256="1" * 64, size=10_000),
    )
    return {Path(n): base.model_copy(update={"cache_key": n * 8, "recipe": n, "files": files}) for n in names}


def test_estimate_counts_weight_files_and_measurement_counts_tensors(base_manifest: Manifest):
    m = fakes(base_manifest, "a")
    assert estimate_bytes(m[Path("a")]) == UNIT_BYTES
    assert measured_bytes(Loader(m)(Path("a"))) == UNIT_BYTES


def test_least_recently_used_is_evicted_first(base_manifest: Manifest):
    ms = fakes(base_manifest, "a", "b", "c")
    loader = Loader(ms)
    pool = Pool(budget=UNIT_BYTES * 5 // 2, loader=loader)  # two fit, three do not
    for name in ("a", "b", "a", "c"):  # a touched after b: b is the least recently used
        with pool.acquire(Path(name), ms[Path(name)]) as lease:
            assert lease.loaded.manifest.recipe == name
    assert loader.calls == ["a", "b", "c"]
    assert [pool.status(ms[Path(n)]).loaded for n in "abc"] == [True, False, True]
    assert pool.used == 2 * UNIT_BYTES
    with pool.acquire(Path("b"), ms[Path("b")]) as lease:  # back on demand, a goes now
        assert lease.load_seconds is not None
    assert [pool.status(ms[Path(n)]).loaded for n in "abc"] == [False, True, True]


def test_evicted_artifact_is_freed(base_manifest: Manifest):
    ms = fakes(base_manifest, "a", "b")
    pool = Pool(budget=UNIT_BYTES * 3 // 2, loader=Loader(ms))
    with pool.acquire(Path("a"), ms[Path("a")]) as lease:
        module = weakref.ref(lease.loaded.pipeline.components["unet"])
    del lease
    with pool.acquire(Path("b"), ms[Path("b")]):
        pass
    gc.collect()
    assert module() is None  # nothing of a's is kept alive by the pool


def test_an_artifact_in_use_is_never_evicted_under_its_request(base_manifest: Manifest):
    ms = fakes(base_manifest, "a", "b")
    pool = Pool(budget=UNIT_BYTES * 3 // 2, loader=Loader(ms), wait_s=0.5)
    holding, release = threading.Event(), threading.Event()

    def request_a() -> None:
        with pool.acquire(Path("a"), ms[Path("a")]):
            holding.set()
            release.wait(10)

    t = threading.Thread(target=request_a)
    t.start()
    assert holding.wait(10)
    with pytest.raises(PoolError, match=r"all in use.*hint:"), pool.acquire(Path("b"), ms[Path("b")]):
        pass
    assert pool.status(ms[Path("a")]).loaded and pool.status(ms[Path("a")]).leases == 1
    # A request that waits gets its room once the running one ends.
    pool.wait_s = 10
    threading.Timer(0.3, release.set).start()
    with pool.acquire(Path("b"), ms[Path("b")]) as lease:
        assert lease.load_seconds is not None
    t.join(10)
    assert not pool.status(ms[Path("a")]).loaded


def test_no_eviction_that_would_not_make_room(base_manifest: Manifest):
    """a in use, b idle, c twice their size: evicting b alone would not fit c, so b stays."""
    ms = {**fakes(base_manifest, "a", "b"), **fakes(base_manifest, "c", units=2)}
    pool = Pool(budget=UNIT_BYTES * 5 // 2, loader=Loader(ms), wait_s=0.3)
    with pool.acquire(Path("b"), ms[Path("b")]), pool.acquire(Path("a"), ms[Path("a")]):
        pass
    with pool.acquire(Path("a"), ms[Path("a")]):
        with pytest.raises(PoolError, match="all in use"), pool.acquire(Path("c"), ms[Path("c")]):
            pass
        assert pool.status(ms[Path("b")]).loaded
    with pool.acquire(Path("c"), ms[Path("c")]) as lease:  # a idle now: both go
        assert lease.load_seconds is not None
    assert [pool.status(ms[Path(n)]).loaded for n in "abc"] == [False, False, True]


def test_concurrent_requests_for_one_artifact_load_it_once(base_manifest: Manifest):
    ms = fakes(base_manifest, "a")
    loader = Loader(ms, delay=0.3)
    pool = Pool(budget=UNIT_BYTES * 2, loader=loader)
    seen: list[tuple[int, bool]] = []

    def request() -> None:
        with pool.acquire(Path("a"), ms[Path("a")]) as lease:
            seen.append((id(lease.loaded), lease.load_seconds is not None))

    threads = [threading.Thread(target=request) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert loader.calls == ["a"]
    assert len({i for i, _ in seen}) == 1 and sorted(loaded for _, loaded in seen) == [False, False, False, True]


def test_too_big_for_the_budget_fails_before_loading(base_manifest: Manifest):
    ms = fakes(base_manifest, "a")
    loader = Loader(ms)
    pool = Pool(budget=UNIT_BYTES - 1, loader=loader)
    with pytest.raises(PoolError, match=r"more than the whole memory budget.*hint: raise UIW_MEMORY_BUDGET"):
        pool.preload(Path("a"), ms[Path("a")])
    assert loader.calls == []


def test_a_failed_load_gives_its_reservation_back(base_manifest: Manifest):
    ms = fakes(base_manifest, "a")
    loader = Loader(ms, fail=True)
    pool = Pool(budget=UNIT_BYTES * 2, loader=loader)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="disk on fire"), pool.acquire(Path("a"), ms[Path("a")]):
            pass
    assert pool.used == 0 and loader.calls == ["a", "a"]


def test_preload_does_not_evict(base_manifest: Manifest):
    ms = fakes(base_manifest, "a", "b")
    pool = Pool(budget=UNIT_BYTES * 3 // 2, loader=Loader(ms))
    assert pool.preload(Path("a"), ms[Path("a")]) is True
    assert pool.preload(Path("b"), ms[Path("b")]) is False
    assert pool.status(ms[Path("a")]).loaded and pool.status(ms[Path("a")]).leases == 0


def test_real_artifact_footprint(service_env):
    """The measured bytes of the loaded demo are its tensors' bytes, counted independently from
    the components' state dicts (plus the non-persistent buffers they leave out), and the estimate
    from the weight files is within a few percent of it."""
    loaded = service_env.default
    state = sum(
        t.numel() * t.element_size()
        for m in loaded.pipeline.components.values()
        if isinstance(m, torch.nn.Module)
        for t in m.state_dict().values()
    )
    measured = measured_bytes(loaded)
    assert state <= measured <= state * 1.01
    assert abs(estimate_bytes(loaded.manifest) - measured) / measured < 0.05
    assert service_env.pool.status(loaded.manifest).footprint == measured


def test_real_eviction_frees_the_evicted_pipeline(tmp_path_factory: pytest.TempPathFactory):
    """Through the service, with real artifacts: once evicted, nothing (pool, executor, batcher,
    task pipelines) keeps the first artifact's UNet alive."""
    from runtime.service import Service, Settings
    from tests.helpers.pair import A, B, compiled_pair

    pair = compiled_pair(tmp_path_factory)
    one = estimate_bytes(read_manifest(pair.paths[A]))
    svc = Service(Settings(artifacts=(A, B), home=pair.home, memory_budget=one * 3 // 2, preload="0"))
    request = {"prompt": "a fox", "seed": 1, "num_inference_steps": 1}
    assert "images" in svc.run({**request, "model": A})
    manifest_a = svc.manifests.get(pair.paths[A])
    with svc.pool.acquire(pair.paths[A], manifest_a) as lease:
        unet = weakref.ref(lease.loaded.pipeline.unet)
    del lease
    assert "images" in svc.run({**request, "model": B})
    assert not svc.pool.status(manifest_a).loaded
    gc.collect()
    assert unet() is None, [type(r).__name__ for r in gc.get_referrers(unet())]


def test_preload_skips_a_model_that_cannot_load(tmp_path_factory: pytest.TempPathFactory, monkeypatch, caplog):
    """UIW_PRELOAD=all with one broken model: the service still starts (it used to raise, and every
    job then rebuilt it), the other model is loaded and serves, and a request for the broken one
    gets its error."""
    import runtime.loader
    from runtime.service import Service, Settings
    from tests.helpers.pair import A, B, compiled_pair

    pair = compiled_pair(tmp_path_factory)
    real = runtime.loader.load

    def load(path: Path) -> Any:
        if path == pair.paths[A]:
            raise OSError("weights unreadable")
        return real(path)

    monkeypatch.setattr(runtime.loader, "load", load)
    svc = Service(Settings(artifacts=(A, B), home=pair.home, preload="all"))
    assert f"preload: {A} not loaded" in caplog.text and "weights unreadable" in caplog.text
    assert not svc.pool.status(svc.manifests.get(pair.paths[A])).loaded
    assert svc.pool.status(svc.manifests.get(pair.paths[B])).loaded
    request = {"prompt": "a fox", "seed": 1, "num_inference_steps": 1}
    assert "images" in svc.run({**request, "model": B})
    broken = svc.run({**request, "model": A})
    assert "loading the model failed" in broken["error"] and "weights unreadable" in broken["error"]
    assert broken["model"]["name"] == A


def test_preload_over_the_budget_does_not_stop_the_service(tmp_path_factory: pytest.TempPathFactory):
    """A budget smaller than every model: the service starts, and requests get the budget error."""
    from runtime.service import Service, Settings
    from tests.helpers.pair import A, B, compiled_pair

    pair = compiled_pair(tmp_path_factory)
    svc = Service(Settings(artifacts=(A, B), home=pair.home, memory_budget=1_000_000, preload="all"))
    assert svc.preload("1") == [] and svc.pool.used == 0
    reply = svc.run({"prompt": "a fox", "model": B})
    assert "more than the whole memory budget" in reply["error"] and "refresh_worker" not in reply
