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

if os.environ.get("UIW_PRELOAD", "1") == "1":
    # Load before taking jobs, so that the first request pays no load; a failure here still lets
    # the worker start and answer every job with the load error.
    try:
        get_service()
    except Exception as e:
        logging.getLogger("runtime").error("preload failed: %s", e)

runpod.serverless.start({"handler": handler})
