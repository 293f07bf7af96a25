"""The source grammar and the lockfile model: pure, so tested directly and exhaustively."""

from __future__ import annotations

from pathlib import Path

import pytest

from compiler import lockfile as lock
from compiler import uri

H = "a" * 64


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("builtin:tiny-sd15", "builtin:tiny-sd15"),
        ("builtin:tiny-sd15@1", "builtin:tiny-sd15@1"),
        ("hf://org/repo", "hf://org/repo@main"),
        ("hf://org/repo@v1.0", "hf://org/repo@v1.0"),
        ("hf://org/repo/unet/w.safetensors", "hf://org/repo/unet/w.safetensors@main"),
        ("hf://org/repo/w.safetensors@refs/pr/1", "hf://org/repo/w.safetensors@refs/pr/1"),
        ("https://huggingface.co/org/repo/resolve/main/w.safetensors", "hf://org/repo/w.safetensors@main"),
        ("https://huggingface.co/org/repo/blob/abc123/sub/w.safetensors", "hf://org/repo/sub/w.safetensors@abc123"),
        ("civitai://models/4201", "civitai://models/4201"),
        ("civitai://models/4201@130072", "civitai://models/4201@130072"),
        ("civitai://models/4201@130072+99", "civitai://models/4201@130072+99"),
        ("civitai://model-versions/130072", "civitai://model-versions/130072"),
        ("urn:air:sd1:checkpoint:civitai:4201@130072", "civitai://models/4201@130072"),
        ("urn:air:sdxl:lora:civitai:4201@130072+99.safetensors", "civitai://models/4201@130072+99"),
        ("https://civitai.com/models/4201/realistic-vision?modelVersionId=130072", "civitai://models/4201@130072"),
        ("https://civitai.com/models/4201", "civitai://models/4201"),
        (
            "https://civitai.com/api/download/models/130072?type=Model&format=SafeTensor",
            "civitai://model-versions/130072",
        ),
        ("https://example.org/m.safetensors", "https://example.org/m.safetensors"),
        (f"https://example.org/m.safetensors#sha256={H.upper()}", f"https://example.org/m.safetensors#sha256={H}"),
        ("http://127.0.0.1:8080/m.safetensors", "http://127.0.0.1:8080/m.safetensors"),
        ("./models/../m.safetensors", "/recipes/m.safetensors"),
        ("/abs/m.safetensors", "/abs/m.safetensors"),
        ("file:///abs/a%20b.safetensors", "/abs/a b.safetensors"),
    ],
)
def test_every_accepted_form_normalises(text: str, normal: str) -> None:
    src = uri.parse(text, base_dir=Path("/recipes"))
    assert str(src) == normal
    assert str(uri.parse(normal, base_dir=Path("/recipes"))) == normal, "the normal form parses to itself"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ftp://example.org/m", "unsupported scheme 'ftp'"),
        ("s3://bucket/m", "unsupported scheme 's3'"),
        ("hf://just-one", "not a HuggingFace source"),
        ("civitai://4201", "not a CivitAI source"),
        ("urn:air:sd1:checkpoint:huggingface:1@2", "only civitai"),
        ("urn:air:sd1:checkpoint:civitai:1+2", "+FILE needs the @VERSION"),
        ("http://example.org/m.safetensors", "plain http is refused"),
        ("https://user:pw@example.org/m", "credentials in a URL"),
        ("https://example.org/m#md5=abc", "#sha256=<64 hex digits>"),
        ("https://civitai.com/images/123", "not a CivitAI model page"),
        ("", "an empty source"),
        ("relative/m.safetensors", "needs the recipe's folder"),
    ],
)
def test_wrong_forms_list_the_accepted_ones(text: str, message: str) -> None:
    with pytest.raises(uri.SourceError) as e:
        uri.parse(text)
    assert message in str(e.value)
    if "scheme" in message or "not a" in message:
        assert "hf://ORG/REPO" in str(e.value) and "civitai://models/" in str(e.value)


def test_a_configured_civitai_mirror_host_means_civitai() -> None:
    assert str(uri.parse("http://127.0.0.1:9/models/7?modelVersionId=8", civitai_hosts=("127.0.0.1",))) == (
        "civitai://models/7@8"
    )
    # Other files on a mirror stay plain URLs.
    assert isinstance(uri.parse("http://127.0.0.1:9/files/x", civitai_hosts=("127.0.0.1",)), uri.UrlSource)


def _entry(source: str, sha: str = H) -> lock.LockEntry:
    return lock.LockEntry(
        source=source,
        kind="file",
        pin=f"sha256:{sha}",
        files=(lock.LockedFile(path="m.safetensors", sha256=f"sha256:{sha}", size=3),),
    )


def test_lockfile_text_is_canonical_and_round_trips() -> None:
    a = lock.Lock(recipe="r", sources={"b": _entry("b"), "a": _entry("a")})
    b = lock.Lock(recipe="r", sources={"a": _entry("a"), "b": _entry("b")})
    assert lock.dumps(a) == lock.dumps(b)
    assert lock.dumps(lock.loads(lock.dumps(a))) == lock.dumps(a)
    text = lock.dumps(a)
    assert text.endswith("}\n") and text.index('"a"') < text.index('"b"')


def test_drift_lists_what_was_added_and_removed() -> None:
    old = lock.Lock(recipe="r", sources={"x": _entry("x"), "y": _entry("y")})
    d = lock.drift(old, ("y", "z"))
    assert (d.added, d.removed) == (("z",), ("x",)) and d
    assert "+ z" in d.describe() and "- x" in d.describe()
    assert not lock.drift(old, ("x", "y"))
    assert lock.drift(None, ("x",)).added == ("x",)
    kept = lock.with_entries(old, "r", {"z": _entry("z", "b" * 64)}, ("y", "z"))
    assert list(kept.sources) == ["y", "z"] and kept.sources["y"] == old.sources["y"]
