"""What the handler replies to a mistaken request, word for word: each reply is compared with its
committed snapshot (tests/snapshots/handler-*.txt), so a reworded or worse message shows in review.
Through the real handler on the session's demo artifact (tiny SD 1.5, served as "demo")."""

from __future__ import annotations

import json

import pytest

from tests.helpers.snapshot import assert_matches_snapshot

PROMPT = "a red fox in the snow"
CASES: dict[str, object] = {
    "width-not-a-multiple-of-8": {"prompt": PROMPT, "width": 100},
    "unknown-field": {"prompt": PROMPT, "sampler_name": "euler"},
    "zero-steps": {"prompt": PROMPT, "num_inference_steps": 0},
    "huge-prompt": {"prompt": "fox " * 50_000},
    "unknown-scheduler": {"prompt": PROMPT, "scheduler": "NOPE"},
    "scheduler-of-another-model": {"prompt": PROMPT, "scheduler": "FLOW_MATCH_EULER"},
    "unknown-model": {"prompt": PROMPT, "model": "sdxl-turbo"},
    "too-many-images": {"prompt": PROMPT, "num_images": 99},
    "input-not-an-object": "a red fox in the snow",
    "several-mistakes-at-once": {"prompt": 7, "height": -8, "guidance_scale": "high"},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_reply_to_each_mistake_is_the_committed_one(call, case: str):
    reply = call(CASES[case])
    assert set(reply) >= {"error"} and "images" not in reply, reply
    assert_matches_snapshot(f"handler-{case}", json.dumps(reply, indent=1, sort_keys=True) + "\n")
