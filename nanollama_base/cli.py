"""What every command shares: errors as one line in the user's terms, and a non-zero exit."""
from __future__ import annotations

import sys


def run_cli(fn) -> None:
    """Run a command body; a user-facing error (bad file, bad flag, mismatch) prints one line
    `error: …` and exits 1 instead of a traceback."""
    try:
        fn()
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
