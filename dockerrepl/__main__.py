"""``python -m dockerrepl``: the command line (see :mod:`dockerrepl._cli`)."""

from __future__ import annotations

import sys
from typing import Optional

from ._cli import main as _main

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of the ``dockerrepl`` console script; returns the exit status."""
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
