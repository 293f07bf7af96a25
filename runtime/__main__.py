"""`python -m runtime`: the RunPod serverless worker (SDK flags such as --test_input and
--rp_serve_api work as with any RunPod handler)."""

import logging
import sys

import runpod

from runtime.artifact import ArtifactError
from runtime.batching import SettingError
from runtime.handler import start_config
from runtime.logs import configure, log_format
from runtime.service import get_service

try:
    # One JSON object per line by default (what log collectors parse); UIW_LOG_FORMAT=text for
    # a person at a terminal. Every UIW_* setting is parsed here (start_config: the memory
    # budget, time limit, batching, progress interval, concurrency, handler choice...): a bad
    # value stops the worker at start (exit code 2) with the reason and a hint, not at its first job.
    configure(log_format("json"))
    config = start_config()
except (ValueError, SettingError, ArtifactError) as e:
    print(f"runtime: {e}", file=sys.stderr)
    sys.exit(2)

# Resolve the served names and load what UIW_PRELOAD names (default `1`: the default model;
# `all`, `0`, or a comma list of names) before taking jobs, so that the first request pays no
# load. A model that cannot be preloaded is logged and skipped (the others serve; a request for
# it gets its error). A failure to resolve the artifacts still lets the worker start and answer
# every job with the error.
try:
    get_service()
except Exception as e:
    logging.getLogger("runtime").error("start-up failed: %s", e)

runpod.serverless.start(config)
