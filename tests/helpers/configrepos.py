"""Config-only Hub repos for the fake Hub: each family's real configs plus tiny real tokenizers.

``compiler.family_configs.CONFIGS`` holds the JSON files of the repos diffusers'
``from_single_file`` reads; the vocabularies are not data there. Here every tokenizer folder gets a
small but real tokenizer next to the real ``tokenizer_config.json`` / ``special_tokens_map.json``:

- CLIP folders: ``vocab.json`` + ``merges.txt`` (the files the real repos ship, no
  ``tokenizer.json``) of ``compiler.tiny_models.tiny_clip_tokenizer()``: the byte alphabet, a few
  merges, ``<|startoftext|>`` / ``<|endoftext|>``. "!" is id 0, as in CLIP's real vocabulary, so
  OpenCLIP's ``pad_token: "!"`` keeps its meaning.
- T5 folders: a ``tokenizer.json`` of ``compiler.tiny_models.tiny_t5_tokenizer()``, a small Unigram
  model built in code (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2 as in T5, then word pieces, then the
  100 sentinels), no sentencepiece model and no download.

``added_tokens_decoder`` in a tokenizer_config pins token ids of the real vocabulary (49407 for
CLIP's ``<|endoftext|>``, 32000+ for T5's sentinels); they are re-keyed to the tiny vocabulary's
ids, everything else (special tokens, padding, ``model_max_length``) is written as the real repo has
it. Ids stay below the real vocabulary sizes, so the tokens index the real-size embedding tables.
"""

from __future__ import annotations

import copy
import json
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from compiler.family_configs import CONFIGS, REPOS


@cache
def _clip_files() -> tuple[bytes, bytes, dict[str, int]]:
    """(vocab.json, merges.txt, vocabulary) of the tiny CLIP tokenizer."""
    from compiler.tiny_models import tiny_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        # transformers 5 saves only tokenizer.json; the real repos ship the slow files, so
        # unpack its BPE model into them.
        tiny_clip_tokenizer().save_pretrained(tmp)
        model = json.loads((Path(tmp) / "tokenizer.json").read_text())["model"]
    vocab: dict[str, int] = model["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab_json = json.dumps(vocab, ensure_ascii=False).encode()
    merges_txt = ("#version: 0.2\n" + "\n".join(merges) + "\n").encode()
    return vocab_json, merges_txt, vocab


@cache
def _t5_files() -> tuple[bytes, dict[str, int]]:
    """(tokenizer.json, vocabulary) of the tiny T5 tokenizer."""
    from compiler.tiny_models import tiny_t5_tokenizer

    tokenizer = tiny_t5_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        data = (Path(tmp) / "tokenizer.json").read_bytes()
    return data, dict(tokenizer.get_vocab())


def _rekey(config: dict[str, Any], vocab: dict[str, int]) -> dict[str, Any]:
    """The tokenizer_config with added_tokens_decoder keyed by the tiny vocabulary's ids."""
    config = copy.deepcopy(config)
    if "added_tokens_decoder" in config:
        added = config["added_tokens_decoder"].values()
        config["added_tokens_decoder"] = {str(vocab[t["content"]]): t for t in added}
    return config


def _dump(content: dict[str, Any]) -> bytes:
    # The Hub's files are 2-space indented, key-sorted JSON with a trailing newline.
    return (json.dumps(content, indent=2, sort_keys=True) + "\n").encode()


def config_repo_files(family: str) -> dict[str, bytes]:
    """A family's (or ``"<family>/<variant>"``'s) config repo as a file tree: path -> bytes."""
    configs = CONFIGS[family]
    files: dict[str, bytes] = {}
    for path, content in configs.items():
        folder, _, name = path.rpartition("/")
        if name == "tokenizer_config.json":
            if content["tokenizer_class"] == "CLIPTokenizer":
                vocab_json, merges_txt, vocab = _clip_files()
                files[f"{folder}/vocab.json"] = vocab_json
                files[f"{folder}/merges.txt"] = merges_txt
            else:
                tokenizer_json, vocab = _t5_files()
                files[f"{folder}/tokenizer.json"] = tokenizer_json
            content = _rekey(content, vocab)
        files[path] = _dump(content)
    return dict(sorted(files.items()))


def push_config_repos(hub: Any, families: list[str] | None = None) -> dict[str, str]:
    """Push each family's config repo to the fake Hub under its real repo id: key -> commit."""
    return {key: hub.repo(REPOS[key]).push(config_repo_files(key)) for key in families or list(CONFIGS)}
