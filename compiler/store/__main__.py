"""`python -m compiler.store ls|show|fetch|verify|gc`: look into and tidy the store.

Hydra owns `python -m compiler`'s arguments, so the store's commands live here, with argparse.
"""

from __future__ import annotations

import sys

from compiler.store.commands import main

sys.exit(main(sys.argv[1:]))
