"""zoo's one progress logger: short lines on stderr, "[zoo] ..." (compiles, loads, graph-cache state).

Plain lines rather than the logging module: they are progress for the person at the terminal, and
they must show with no logging set-up (a script, a CLI, a rank process)."""
from __future__ import annotations

import sys


def log(msg: str, source: str = "zoo") -> None:
    print(f"[{source}] {msg}", file=sys.stderr, flush=True)
