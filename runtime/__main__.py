"""`python -m runtime`: the RunPod serverless worker (SDK flags such as --test_input and
--rp_serve_api work as with any RunPod handler)."""

import logging
import sys
from dataclasses import replace

from runtime import threads

# Before anything imports torch: its OpenMP runtime reads the wait policy once, when it loads
# (runtime.threads: waiting threads sleep instead of spinning, unless the user set a policy).
WAIT_POLICY = threads.prefer_passive_wait()

import runpod  # noqa: E402  (after the wait policy: see above)

from runtime import bootstrap  # noqa: E402
from runtime.handler import start_config  # noqa: E402
from runtime.logs import configure  # noqa: E402
from runtime.service import get_service  # noqa: E402
from runtime.settings import SettingError, WorkerSettings  # noqa: E402

try:
    # Every UIW_* setting is parsed here, into one value (runtime.settings): a bad value stops the
    # worker at start (exit code 2) with the reason and a hint, not at its first job.
    cores = threads.usable_cores()
    settings = WorkerSettings.from_env(cores)
except SettingError as e:
    print(f"runtime: {e}", file=sys.stderr)
    sys.exit(2)
# One JSON object per line by default (what log collectors parse); UIW_LOG_FORMAT=text for a
# person at a terminal.
configure(settings.log_format, settings.log_level)
config = start_config(settings)
thread_choice = threads.decide(settings.threads, settings.omp_num_threads, settings.concurrency, cores)

# torch's intra-op threads for this worker (runtime.threads): the start log says what and why.
torch_threads = threads.apply(thread_choice)
logging.getLogger("runtime").info(
    "CPU threads: %d per job (%s); OMP_WAIT_POLICY=%s",
    torch_threads,
    thread_choice.reason,
    WAIT_POLICY,
    extra={
        "fields": {
            "threads": torch_threads,
            "cores": thread_choice.cores.count,
            "cores_source": thread_choice.cores.source,
            "concurrency": thread_choice.concurrency,
        }
    },
)

# Resolve the served names and load what UIW_PRELOAD names (default `1`: the default model;
# `all`, `0`, or a comma list of names) before taking jobs, so that the first request pays no
# load. A model that cannot be preloaded is logged and skipped (the others serve; a request for
# it gets its error). A failure to resolve the artifacts still lets the worker start and answer
# every job with the error.
# Artifacts baked into the image are served from it before the store (a network volume).
# A model named by the environment (UIW_MODEL, UIW_RECIPE) is compiled first, by a child process,
# while jobs wait for it (runtime.bootstrap); the service is made when it is built.
service_settings = bootstrap.prefer_image(settings.service, settings.image_home)
if settings.model is not None:
    bootstrap.start(replace(settings, service=service_settings))
else:
    try:
        get_service(service_settings)
    except Exception as e:
        logging.getLogger("runtime").error("start-up failed: %s", e)

runpod.serverless.start(config)
