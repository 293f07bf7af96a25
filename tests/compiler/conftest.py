"""Fixtures the compiler's source tests share: the tiny SD 1.5 as a Hub repo, served by a loopback
test Hub for the whole session (one server however many test modules use it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers.fakehub import FakeHub, tree

TINY = "uiw-test/tiny-sd15"


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The builtin tiny SD 1.5 as a HuggingFace diffusers repo: fp32 weights, fp16 variants, and
    files a pipeline never reads (a pickled duplicate, a README, an image)."""
    import torch

    from compiler.tiny_models import BUILTINS

    folder = tmp_path_factory.mktemp("tiny-repo")
    pipe = BUILTINS["tiny-sd15"].build()
    pipe.save_pretrained(folder)
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    files = tree(folder)
    files["unet/diffusion_pytorch_model.bin"] = b"not a pickle anyone should load"
    files["README.md"] = b"# tiny\n"
    files["sample.png"] = b"\x89PNG fake"
    return files


@pytest.fixture(scope="session")
def hub(tiny_tree: dict[str, bytes]) -> Iterator[FakeHub]:
    h = FakeHub().start()
    h.repo(TINY).push(tiny_tree)
    yield h
    h.stop()
