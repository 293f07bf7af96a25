"""`python -m runtime`: the RunPod serverless worker (SDK flags such as --test_input and
--rp_serve_api work as with any RunPod handler)."""

import logging
import os
import sys

import runpod

from runtime.handler import handler
from runtime.service import get_service

logging.basicConfig(
    stream=sys.stderr,
    level=os.environ.get("UIW_LOG_LEVEL", "INFO"),
    format="%(asctime)s %(levelname)s %(name)s: %(message)s",
)

# Check the settings (served names, UIW_MEMORY_BUDGET) and load what UIW_PRELOAD names (default
# `1`: the default model; `all`, `0`, or a comma list of names) before taking jobs, so that the
# first request pays no load. A failure here still lets the worker start and answer every job
# with the error.
try:
    get_service()
except Exception as e:
    logging.getLogger("runtime").error("start-up failed: %s", e)

runpod.serverless.start({"handler": handler})
