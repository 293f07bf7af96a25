"""Config-only Hub repos for the fake Hub: each family's real configs plus tiny real tokenizers.

``compiler.family_configs.CONFIGS`` holds the JSON files of the repos diffusers'
``from_single_file`` reads; the vocabularies are not data there. Here every tokenizer folder gets a
small but real tokenizer next to the real ``tokenizer_config.json`` / ``special_tokens_map.json``:

- CLIP folders: ``vocab.json`` + ``merges.txt`` (the files the real repos ship, no
  ``tokenizer.json``) of ``compiler.builtins.tiny_clip_tokenizer()``: the byte alphabet, a few
  merges, ``<|startoftext|>`` / ``<|endoftext|>``. "!" is id 0, as in CLIP's real vocabulary, so
  OpenCLIP's ``pad_token: "!"`` keeps its meaning.
- T5 folders: a ``tokenizer.json`` holding a small Unigram model built in code (``<pad>`` 0,
  ``</s>`` 1, ``<unk>`` 2 as in T5, then word pieces, then the 100 sentinels), no sentencepiece
  model and no download.

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

# Word pieces of the tiny T5 vocabulary after <pad>, </s>, <unk>: a scored Unigram model over
# whole words, "▁"-prefixed word starts and single characters (so letters, digits and common
# punctuation tokenize without <unk>). Scores are log-probability-like: longer pieces win.
_T5_WORDS = ("a", "photo", "of", "cat", "dog", "the", "in", "on", "with", "and", "an", "astronaut", "red", "blue")
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-"


def _t5_vocab() -> list[tuple[str, float]]:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -3.0 - i * 0.01) for i, w in enumerate(_T5_WORDS)]
    pieces += [(f"▁{c}", -6.0) for c in _T5_CHARS]
    pieces += [(c, -7.0) for c in _T5_CHARS]
    # T5 stores its sentinels last and in reverse: <extra_id_99> first, <extra_id_0> last.
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    # A piece listed twice ("▁a" is a word and a character) keeps its first id and score.
    unique: dict[str, float] = {}
    for piece, score in pieces:
        unique.setdefault(piece, score)
    return list(unique.items())


@cache
def _clip_files() -> tuple[bytes, bytes, dict[str, int]]:
    """(vocab.json, merges.txt, vocabulary) of the tiny CLIP tokenizer."""
    from compiler.builtins import tiny_clip_tokenizer

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
    # transformers 5's T5Tokenizer (T5TokenizerFast is its alias) is the tokenizers-backed Unigram
    # one and takes the vocabulary as (piece, score) pairs: no sentencepiece model needed.
    from transformers import T5Tokenizer

    vocab = _t5_vocab()
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=100, model_max_length=512)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        data = (Path(tmp) / "tokenizer.json").read_bytes()
    return data, {piece: i for i, (piece, _) in enumerate(vocab)}


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
