"""`python -m compiler recipe=NAME [overrides]`: the command line over ``compiler.build``.

Contract: on success stdout carries exactly one line, the absolute artifact directory; all logs go
to stderr; on failure stdout is empty and the exit status is 2 for the user's errors (printed
without a traceback; UIW_DEBUG=1 shows it), 1 otherwise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from compiler.build import build
from compiler.errors import UserError
from runtime.artifact import DEFAULT_HOME

log = logging.getLogger("compiler")

USAGE = f"""usage: python -m compiler recipe=NAME [key=value ...]

Compiles recipes/NAME.yaml into an artifact and prints its directory.
  recipe=NAME        the recipe to compile (recipes_dir=DIR or env UIW_RECIPES: where recipes live)
  home=DIR           the store (env UIW_HOME, default {DEFAULT_HOME})
  lock=MODE          auto (default), locked, frozen or update: how recipes/NAME.lock.json is used
  precision=fp16     any recipe field; command-line values win over the recipe file
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        sys.stderr.write(USAGE)
        return 0
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("UIW_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    debug = os.environ.get("UIW_DEBUG") == "1"
    try:
        # Libraries that print (progress bars, warnings) must not pollute the one-line stdout.
        with contextlib.redirect_stdout(sys.stderr):
            path = build(argv)
    except UserError as e:
        if debug:
            log.exception("user error")
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; nothing was published\n")
        return 130
    except Exception as e:
        log.error("internal error: %s: %s", type(e).__name__, e, exc_info=True)
        return 1
    sys.stdout.write(f"{path}\n")
    sys.stdout.flush()
    return 0
