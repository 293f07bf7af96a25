"""What every scheme module shares: the context it runs in and the pin it produces."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from compiler.sources.download import Policy
from compiler.store import Store

DEFAULT_CIVITAI_BASE_URL = "https://civitai.com"


@dataclass(frozen=True)
class Context:
    """Settings read once from the environment. Tokens are *not* kept here: each scheme reads its
    own token when it builds a request, so no object that might be logged or hashed holds one."""

    store: Store
    policy: Policy
    civitai_base: str  # site root; the API is under /api/v1, downloads under /api/download
    hf_endpoint: str
    allow_pickle: bool = False

    @classmethod
    def from_env(cls, store: Store) -> Context:
        return cls(
            store=store,
            policy=Policy.from_env(),
            civitai_base=os.environ.get("CIVITAI_BASE_URL", DEFAULT_CIVITAI_BASE_URL).rstrip("/"),
            # Read as huggingface_hub reads it, without importing it (a cache hit stays light).
            hf_endpoint=os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/"),
        )


@dataclass(frozen=True)
class Pinned:
    """A locked source as the plan (and so the cache key) sees it: its bytes."""

    pin: str  # scheme-prefixed fingerprint
    inputs: tuple[tuple[str, str], ...]  # (path, "sha256:…") of every file the build reads


@dataclass(frozen=True)
class Resolved(Pinned):
    """A locked pipeline source, with what the plan needs to fill in the family's defaults."""

    family: str
    native_size: tuple[int, int]
    # "inpaint" when the pipeline class is its family's inpaint one (a 9-channel UNet, FLUX Fill)
    model_variant: str = "normal"


@dataclass(frozen=True)
class Fetched:
    """A locked source's files on local disk, ready for materialize: path in the source -> file."""

    source: str
    kind: str
    files: dict[str, Path]
    root: Path | None = None  # a local folder used in place
