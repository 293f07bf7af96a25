"""`python -m compiler.store ...`: the store's commands (``compiler.store_cli``)."""

from __future__ import annotations

import sys

from compiler.store_cli import main

sys.exit(main(sys.argv[1:]))
