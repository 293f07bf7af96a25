"""hf:// sources through huggingface_hub (honours HF_ENDPOINT, HF_TOKEN, HF_HOME).

Lock time: one ``model_info(files_metadata=True)`` call turns the revision into its commit sha and
gives every file's size and LFS sha256; the small non-LFS files (model_index.json, configs,
tokenizer files) are downloaded once, checked against their git blob id, stored as blobs and pinned
by sha256. Only the files a diffusers pipeline loads are pinned: each component's configs and
tokenizer files and its safetensors weights, plain and fp16/bf16 ``variant`` files alike (so a
``precision=fp16`` override never relocks); pickled .bin duplicates, READMEs and images are not.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

from compiler import uri
from compiler.errors import UserError
from compiler.families import family_of_repo
from compiler.generic import diffusers_has, family_id
from compiler.lockfile import LockedFile, LockEntry
from compiler.sources.base import Context, Fetched
from compiler.sources.blobs import fetch_pinned, fetch_unpinned
from compiler.sources.download import HttpStatusError, TransferError

PRECISION_VARIANTS = {"fp16": "fp16", "bf16": "bf16"}  # recipe precision -> diffusers variant it can use
_VARIANT = re.compile(
    r"\.(?P<v>[a-z0-9_]+)(?:-\d{5}-of-\d{5})?\.safetensors$|\.safetensors\.index\.(?P<iv>[a-z0-9_]+)\.json$"
)
_WEIGHTS = re.compile(r"\.safetensors$|\.safetensors\.index(\.[a-z0-9_]+)?\.json$")
_PICKLE = re.compile(r"\.(bin|ckpt|pt|pth|pkl)$|\.bin\.index(\.[a-z0-9_]+)?\.json$")
_SIDE = re.compile(r"\.(json|txt|model)$")  # configs, tokenizer vocab/merges, sentencepiece models


def _hf() -> Any:
    import huggingface_hub

    return huggingface_hub


def _headers() -> dict[str, str]:
    # build_hf_headers reads HF_TOKEN or the token saved under HF_HOME; the dict is never logged.
    return dict(_hf().utils.build_hf_headers(library_name="universal-image-worker"))


def file_url(ctx: Context, repo: str, path: str, commit: str) -> str:
    return str(_hf().hf_hub_url(repo, path, revision=commit, endpoint=ctx.hf_endpoint))


def variant_of(path: str) -> str | None:
    m = _VARIANT.search(path)
    return (m.group("v") or m.group("iv")) if m else None


def select_files(index: dict[str, Any], names: Iterable[str], where: str) -> list[str]:
    """The files of a diffusers repo a pipeline load reads, for every precision. Pure."""
    names = sorted(names)
    components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    chosen = ["model_index.json"]
    for comp in components:
        inside = [n for n in names if n.startswith(comp + "/") and n.count("/") == 1]
        weights = [n for n in inside if _WEIGHTS.search(n) and variant_of(n) in (None, *PRECISION_VARIANTS.values())]
        pickles = [n for n in inside if _PICKLE.search(n)]
        if pickles and not any(_WEIGHTS.search(n) for n in inside):
            raise UserError.one(
                where,
                f"component {comp!r} has only pickled weights ({', '.join(pickles)})",
                "pickle can run code when loaded; use a repo (or revision) with .safetensors weights",
            )
        side = [n for n in inside if _SIDE.search(n) and not _WEIGHTS.search(n) and not _PICKLE.search(n)]
        chosen += side + weights
    return sorted(set(chosen))


def wanted(entry: LockEntry, precision: str, configs_only: bool = False) -> tuple[str, ...]:
    """The locked files a build at ``precision`` reads: a component's variant weights where the
    precision has a variant and the component ships it, its plain weights otherwise."""
    if entry.kind == "file":
        return tuple(f.path for f in entry.files)
    variant = PRECISION_VARIANTS.get(precision)
    by_comp: dict[str, list[LockedFile]] = {}
    for f in entry.files:
        by_comp.setdefault(f.path.rpartition("/")[0], []).append(f)
    out = []
    for files in by_comp.values():
        has_variant = variant is not None and any(f.variant == variant for f in files)
        for f in files:
            if not _WEIGHTS.search(f.path) or (not configs_only and f.variant == (variant if has_variant else None)):
                out.append(f.path)
    return tuple(sorted(out))


def diffusers_variant(entry: LockEntry, precision: str) -> str | None:
    v = PRECISION_VARIANTS.get(precision)
    return v if v in entry.meta.get("variants", ()) else None


def _user_error(e: Exception, where: str, src: uri.HfSource, endpoint: str) -> UserError:
    """huggingface_hub's typed errors -> what to do about them."""
    errors = _hf().errors
    name = type(e).__name__
    page = f"{endpoint}/{src.repo}"
    if isinstance(e, errors.OfflineModeIsEnabled):
        return UserError.one(
            where,
            f"HF_HUB_OFFLINE is set, so {src} cannot be locked or fetched",
            "unset HF_HUB_OFFLINE to compile, or use lock=frozen with the blobs already in the store",
        )
    if isinstance(e, errors.GatedRepoError):
        return UserError.one(where, f"{src.repo} is gated", f"accept its terms at {page}, then set HF_TOKEN")
    if isinstance(e, errors.RevisionNotFoundError):
        return UserError.one(
            where, f"{src.repo} has no revision {src.revision!r}", f"check the branches and tags at {page}"
        )
    if isinstance(e, errors.RepositoryNotFoundError):
        return UserError.one(
            where,
            f"repository {src.repo} not found (or private: the Hub answers 401/404 alike)",
            "check the spelling; for a private repo set HF_TOKEN to a token that can read it",
        )
    if isinstance(e, HttpStatusError) and e.status in (401, 403):
        return UserError.one(where, f"HTTP {e.status} for {src}", f"set HF_TOKEN (and accept the terms at {page})")
    if isinstance(e, HttpStatusError) and e.status == 404:
        return UserError.one(where, f"{src}: a locked file is gone (HTTP 404)", "relock with lock=update")
    if isinstance(e, TransferError):
        return UserError.one(where, f"cannot download from {endpoint}: {e}", "check the network or HF_ENDPOINT")
    status = getattr(getattr(e, "response", None), "status_code", None)
    return UserError.one(
        where,
        f"{name} from {endpoint} for {src}" + (f" (HTTP {status})" if status else "") + f": {e}",
        "check HF_ENDPOINT and the network; retry later if the Hub is down",
    )


def _is_transport_error(e: Exception) -> bool:
    """huggingface_hub 2.x talks through its own HTTP stack (httpx2/httpcore2 here), whose transport
    errors are not OSErrors; recognise them by module rather than pin a private package."""
    return type(e).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3")


def _pin_file(ctx: Context, repo: str, commit: str, sibling: Any, where: str) -> LockedFile:
    path = sibling.rfilename
    variant = variant_of(path)
    if sibling.lfs is not None:
        return LockedFile(path=path, sha256=f"sha256:{sibling.lfs.sha256}", size=sibling.lfs.size, variant=variant)
    # A plain git file: the Hub gives its git blob id, not a sha256. Fetch it (configs are small),
    # check the blob id, and pin the sha256 of the bytes.
    digest, size, blob = fetch_unpinned(ctx, file_url(ctx, repo, path, commit), _headers(), f"{repo}/{path}")
    data = blob.read_bytes()
    git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    if sibling.blob_id and git_oid != sibling.blob_id:
        raise UserError.one(
            where,
            f"{repo}/{path}: git blob id {git_oid} does not match the Hub's {sibling.blob_id}",
            "the endpoint served other bytes than it lists; check HF_ENDPOINT or retry",
        )
    return LockedFile(path=path, sha256=f"sha256:{digest}", size=size, variant=variant)


def inventory(src: uri.HfSource, where: str, ctx: Context) -> LockEntry:
    hf = _hf()
    api = hf.HfApi(endpoint=ctx.hf_endpoint, library_name="universal-image-worker")
    try:
        info = api.model_info(src.repo, revision=src.revision, files_metadata=True, timeout=ctx.policy.timeout)
        commit = info.sha
        siblings = {s.rfilename: s for s in info.siblings or []}
        meta: dict[str, Any] = {"repo": src.repo, "requested_revision": src.revision, "commit": commit}
        if src.path is not None:
            sibling = siblings.get(src.path)
            if sibling is None:
                candidates = sorted(n for n in siblings if n.endswith((".safetensors", ".ckpt", ".bin")))[:20]
                raise UserError.one(
                    where,
                    f"{src.repo}@{src.revision} has no file {src.path!r}",
                    "files with weights there: " + (", ".join(candidates) or "none"),
                )
            return LockEntry(
                source=str(src),
                kind="file",
                pin=f"commit:{commit}",
                files=(_pin_file(ctx, src.repo, commit, sibling, where),),
                meta=meta,
            )
        if "model_index.json" not in siblings:
            weights = sorted(n for n in siblings if n.endswith(".safetensors"))[:10]
            raise UserError.one(
                where,
                f"{src.repo} is not a diffusers pipeline repo (no model_index.json)",
                "name one of its files instead, e.g. hf://"
                + src.repo
                + "/"
                + (weights[0] if weights else "FILE.safetensors"),
            )
        index_file = _pin_file(ctx, src.repo, commit, siblings["model_index.json"], where)
        index = json.loads(ctx.store.blob_path(index_file.hex).read_text())
        files = [index_file] + [
            _pin_file(ctx, src.repo, commit, siblings[n], where)
            for n in select_files(index, siblings, where)
            if n != "model_index.json"
        ]
    except UserError:
        raise
    except (HttpStatusError, TransferError, hf.errors.HfHubHTTPError, OSError) as e:
        raise _user_error(e, where, src, ctx.hf_endpoint) from None
    except Exception as e:
        if not _is_transport_error(e):
            raise
        raise UserError.one(
            where,
            f"cannot reach {ctx.hf_endpoint}: {type(e).__name__}: {e}",
            "check the network and HF_ENDPOINT (a mirror's URL, or unset for huggingface.co)",
        ) from None
    configs = {
        f.path: json.loads(ctx.store.blob_path(f.hex).read_text()) for f in files if f.path.endswith("config.json")
    }
    meta.update(pipeline_meta(index, configs), variants=sorted({f.variant for f in files if f.variant}))
    return LockEntry(source=str(src), kind="repo", pin=f"commit:{commit}", files=tuple(files), meta=meta)


def pipeline_meta(index: dict[str, Any], configs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What the plan needs of a diffusers pipeline, from its model_index.json and configs (pure)."""
    found = family_of_repo(index.get("_class_name"), configs)
    meta: dict[str, Any] = {"pipeline_class": index.get("_class_name"), "native_size": native_size(configs)}
    if found.family is None and not found.candidates and diffusers_has(index.get("_class_name")):
        # No family serves the class, but diffusers has it: the generic path (compiler.generic).
        meta["family"] = family_id(index["_class_name"])
        meta["family_evidence"] = [f"_class_name {index['_class_name']}: no family entry, served generically"]
        return meta
    meta["family"] = found.family
    if found.family is None:
        meta["family_candidates"] = list(found.candidates)
    meta["family_evidence"] = list(found.evidence)
    return meta


def native_size(configs: dict[str, dict[str, Any]]) -> list[int] | None:
    """Width and height the pipeline was trained at, as diffusers computes its default size:
    the denoiser's sample_size times the VAE's downscale factor."""
    den = configs.get("unet/config.json") or configs.get("transformer/config.json")
    vae = configs.get("vae/config.json")
    if not den or not vae or "sample_size" not in den:
        return None
    scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    s = den["sample_size"]
    h, w = (s, s) if isinstance(s, int) else s
    return [w * scale, h * scale]


def fetch(entry: LockEntry, where: str, ctx: Context, paths: tuple[str, ...]) -> Fetched:
    src = uri.parse(entry.source)
    assert isinstance(src, uri.HfSource)
    commit = entry.pin.removeprefix("commit:")
    out = {}
    try:
        for p in paths:
            f = entry.file(p)
            have = ctx.store.blob_path(f.hex)
            if have.is_file():  # no URL, no headers: huggingface_hub is not even imported (lock=frozen: no call)
                out[p] = have
                continue
            out[p] = fetch_pinned(ctx, f, file_url(ctx, src.repo, p, commit), _headers(), f"{src.repo}/{p}")
    except (HttpStatusError, TransferError) as e:
        raise _user_error(e, where, src, ctx.hf_endpoint) from None
    return Fetched(source=entry.source, kind=entry.kind, files=out)
