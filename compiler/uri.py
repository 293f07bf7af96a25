"""The one grammar of model sources. Pure: parses strings, touches nothing.

Every accepted spelling is normalised to one canonical form (``str(source)``), so that two recipes
naming the same bytes differently lock and hash the same. Local paths are made absolute against the
recipe's folder here, so the caller passes that folder in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

FORMS = (
    "builtin:NAME[@REVISION]                                e.g. builtin:tiny-sd15",
    "hf://ORG/REPO[@REVISION]  (a diffusers repo)           e.g. hf://stable-diffusion-v1-5/stable-diffusion-v1-5@main",
    "hf://ORG/REPO/PATH/FILE.safetensors[@REVISION]         e.g. hf://org/repo/v1-5-pruned.safetensors",
    "civitai://models/MODEL_ID[@VERSION_ID[+FILE_ID]]       e.g. civitai://models/4201@130072",
    "civitai://model-versions/VERSION_ID                    e.g. civitai://model-versions/130072",
    "urn:air:ECOSYSTEM:TYPE:civitai:MODEL_ID@VERSION_ID[+FILE_ID]  e.g. urn:air:sd1:checkpoint:civitai:4201@130072",
    "https://civitai.com/models/ID[?modelVersionId=VID] or https://civitai.com/api/download/models/VID",
    "https://huggingface.co/ORG/REPO/resolve/REV/FILE",
    "https://HOST/PATH[#sha256=HEX]                         e.g. https://example.org/m.safetensors#sha256=...",
    "a local file or folder: /abs/path, ./relative/to/the/recipe, ~/path, file:///abs/path",
)
ACCEPTED = "accepted forms:\n    " + "\n    ".join(FORMS)

DEFAULT_HF_REVISION = "main"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Any name-like word parses: whether this compiler has the model is the recipe check's to say (it
# lists the built-ins), so `builtin:tiny-sd1.5` is "no built-in model", not "unsupported scheme".
_BUILTIN = re.compile(r"^builtin:(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[0-9]+))?$")
_REPO_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HF = re.compile(rf"^hf://(?P<repo>{_REPO_PART}/{_REPO_PART})(?:/(?P<path>[^@]+?))?/?(?:@(?P<rev>[^@\s]+))?$")
_CIVITAI = re.compile(r"^civitai://models/(?P<model>[0-9]+)(?:@(?P<version>[0-9]+)(?:\+(?P<file>[0-9]+))?)?$")
_CIVITAI_VERSION = re.compile(r"^civitai://model-versions/(?P<version>[0-9]+)(?:\+(?P<file>[0-9]+))?$")
_AIR = re.compile(
    r"^urn:air:(?P<eco>[a-z0-9.]+):(?P<type>[a-z0-9]+):(?P<source>[a-z]+):(?P<model>[0-9]+)(?:@(?P<version>[0-9]+))?"
    r"(?:\+(?P<file>[0-9]+))?(?:\.[a-z0-9]+)?$"
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
CIVITAI_HOSTS = ("civitai.com", "www.civitai.com", "civitai.green")
HF_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")


class SourceError(ValueError):
    """A source string that does not parse; the message lists the accepted forms."""


@dataclass(frozen=True)
class BuiltinSource:
    name: str
    revision: int | None  # None: the current revision

    def __str__(self) -> str:
        return f"builtin:{self.name}" + (f"@{self.revision}" if self.revision is not None else "")


@dataclass(frozen=True)
class HfSource:
    repo: str
    path: str | None  # None: the whole repo, a diffusers pipeline
    revision: str  # branch, tag or commit sha as written; the lock pins the commit

    def __str__(self) -> str:
        return f"hf://{self.repo}" + (f"/{self.path}" if self.path else "") + f"@{self.revision}"


@dataclass(frozen=True)
class CivitaiSource:
    model_id: int | None  # None when only a version was named (a download URL)
    version_id: int | None  # None: the model's latest version, pinned at lock time
    file_id: int | None = None  # one file of the version (AIR's +FILE); None: its primary safetensors

    def __str__(self) -> str:
        file = f"+{self.file_id}" if self.file_id is not None else ""
        if self.model_id is None:
            return f"civitai://model-versions/{self.version_id}{file}"
        return f"civitai://models/{self.model_id}" + (
            f"@{self.version_id}{file}" if self.version_id is not None else ""
        )


@dataclass(frozen=True)
class UrlSource:
    url: str  # without the fragment
    sha256: str | None  # the pin written in the recipe, if any

    def __str__(self) -> str:
        return self.url + (f"#sha256={self.sha256}" if self.sha256 else "")


@dataclass(frozen=True)
class LocalSource:
    path: Path  # absolute

    def __str__(self) -> str:
        return self.path.as_posix()


Source = BuiltinSource | HfSource | CivitaiSource | UrlSource | LocalSource


def is_single_file(source: Source) -> bool | None:
    """True for sources naming one file, False for a pipeline folder/repo, None when only the disk can
    tell (a local path)."""
    if isinstance(source, HfSource):
        return source.path is not None
    if isinstance(source, CivitaiSource | UrlSource):
        return True
    if isinstance(source, BuiltinSource):
        return False
    return None


def parse(text: str, base_dir: Path | None = None, civitai_hosts: tuple[str, ...] = ()) -> Source:
    """Parse and normalise one source. ``base_dir`` anchors relative local paths (the recipe's
    folder); ``civitai_hosts`` adds hosts (a configured CIVITAI_BASE_URL) whose URLs mean CivitAI."""
    text = text.strip()
    if not text:
        raise SourceError(f"an empty source; {ACCEPTED}")
    if m := _BUILTIN.match(text):
        rev = m.group("rev")
        return BuiltinSource(m.group("name"), int(rev) if rev is not None else None)
    if text.startswith("builtin:"):
        raise SourceError(f"{text!r} is not a built-in source (builtin:NAME[@REVISION], e.g. builtin:tiny-sd15)")
    if text.startswith("hf://"):
        if m := _HF.match(text):
            return HfSource(m.group("repo"), m.group("path"), m.group("rev") or DEFAULT_HF_REVISION)
        raise SourceError(f"{text!r} is not a HuggingFace source (hf://ORG/REPO[/FILE][@REV]); {ACCEPTED}")
    if text.startswith("civitai://"):
        if m := _CIVITAI.match(text):
            return CivitaiSource(int(m.group("model")), _int(m.group("version")), _int(m.group("file")))
        if m := _CIVITAI_VERSION.match(text):
            return CivitaiSource(None, int(m.group("version")), _int(m.group("file")))
        raise SourceError(f"{text!r} is not a CivitAI source (civitai://models/ID[@VERSION]); {ACCEPTED}")
    if text.startswith("urn:air:"):
        return _parse_air(text)
    if text.startswith(("https://", "http://")):
        return _parse_url(text, civitai_hosts)
    if text.startswith("file://"):
        return LocalSource(Path(unquote(urlsplit(text).path)))
    if _SCHEME.match(text) and not re.match(r"^[A-Za-z]:[\\/]", text):
        raise SourceError(f"{text!r}: unsupported scheme {text.split(':', 1)[0]!r}; {ACCEPTED}")
    path = Path(text).expanduser()
    if not path.is_absolute():
        if base_dir is None:
            raise SourceError(f"{text!r}: a relative path needs the recipe's folder to anchor it")
        path = base_dir / path
    return LocalSource(Path(_normpath(path)))


def _int(v: str | None) -> int | None:
    return int(v) if v is not None else None


def _normpath(path: Path) -> str:
    # Lexical normalisation (no symlink resolution: that would touch the disk and change with it).
    import posixpath

    return posixpath.normpath(path.as_posix())


def _parse_air(text: str) -> Source:
    m = _AIR.match(text)
    if not m:
        raise SourceError(f"{text!r} is not an AIR URN (urn:air:ECOSYSTEM:TYPE:SOURCE:ID@VERSION); {ACCEPTED}")
    if m.group("source") != "civitai":
        raise SourceError(f"{text!r}: AIR source {m.group('source')!r} is not supported; only civitai; {ACCEPTED}")
    if m.group("file") and not m.group("version"):
        raise SourceError(f"{text!r}: a +FILE needs the @VERSION before it")
    return CivitaiSource(int(m.group("model")), _int(m.group("version")), _int(m.group("file")))


def _parse_url(text: str, civitai_hosts: tuple[str, ...]) -> Source:
    parts = urlsplit(text)
    host = (parts.hostname or "").lower()
    if not host:
        raise SourceError(f"{text!r}: a URL without a host; {ACCEPTED}")
    if parts.username or parts.password:
        raise SourceError(f"{text!r}: credentials in a URL would end up in the lockfile; use a token env var instead")
    if parts.scheme == "http" and host not in _LOOPBACK:
        raise SourceError(f"{text!r}: plain http is refused for remote hosts; use https://")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    query = parse_qs(parts.query)
    if host in CIVITAI_HOSTS or host in {h.lower() for h in civitai_hosts}:
        if segments[:1] == ["models"] and len(segments) >= 2 and segments[1].isdigit():
            version = query.get("modelVersionId", [None])[0]
            if version is not None and not version.isdigit():
                raise SourceError(f"{text!r}: modelVersionId must be a number")
            return CivitaiSource(int(segments[1]), _int(version))
        if segments[:3] == ["api", "download", "models"] and len(segments) == 4 and segments[3].isdigit():
            return CivitaiSource(None, int(segments[3]))
        if host in CIVITAI_HOSTS:  # a configured mirror may serve other files too: those are plain URLs
            raise SourceError(f"{text!r}: not a CivitAI model page or download URL; {ACCEPTED}")
    if host in HF_HOSTS and len(segments) >= 5 and segments[2] in ("resolve", "blob"):
        return HfSource(f"{segments[0]}/{segments[1]}", "/".join(segments[4:]), segments[3])
    sha = None
    if parts.fragment:
        key, _, value = parts.fragment.partition("=")
        if key != "sha256" or not _SHA256.match(value.lower()):
            raise SourceError(f"{text!r}: the fragment must be #sha256=<64 hex digits>")
        sha = value.lower()
    return UrlSource(parts._replace(fragment="").geturl(), sha)
