"""Tokenizers across request threads (runtime.generate.own_tokenizers): HF fast tokenizers keep
padding/truncation state on one shared Rust object, so concurrent encode_prompt calls could get
each other's padding (a CI run failed on it: 19 tokens where 77 were asked). Each thread must
encode with its own copy, and the copy must tokenize exactly as the original."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from compiler.tiny_models import tiny_clip_tokenizer
from runtime.generate import own_tokenizers

PROMPTS = ["a red fox in the snow", "a lighthouse at dusk with a very long description " * 3]


def test_each_thread_encodes_with_its_own_copy_that_tokenizes_like_the_original():
    original = tiny_clip_tokenizer()
    pipeline = SimpleNamespace(components={"tokenizer": original, "unet": object(), "tokenizer_2": None})
    expected = {
        (p, mode): original(p, padding=mode, max_length=77, truncation=True).input_ids
        for p in PROMPTS
        for mode in ("max_length", "longest")
    }
    seen: dict[int, object] = {}
    errors: list[str] = []

    def work(worker: int) -> None:
        mine = own_tokenizers(pipeline)
        assert set(mine) == {"tokenizer"}
        tok = mine["tokenizer"]
        seen[worker] = tok
        assert own_tokenizers(pipeline)["tokenizer"] is tok  # made once per thread
        for i in range(200):
            prompt, mode = PROMPTS[i % 2], ("max_length", "longest")[(i + worker) % 2]
            ids = tok(prompt, padding=mode, max_length=77, truncation=True).input_ids
            if ids != expected[(prompt, mode)]:
                errors.append(f"worker {worker}: {mode} {prompt!r} -> {len(ids)} tokens")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    copies = list(seen.values())
    assert len({id(c) for c in copies}) == 4 and all(c is not original for c in copies)
