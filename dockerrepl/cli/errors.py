"""The command line's exit statuses and its two exceptions (no library code loaded)."""

from __future__ import annotations

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERRUPTED",
    "EXIT_OOM",
    "EXIT_SETUP",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "CliError",
    "Terminated",
]

EXIT_ERROR = 1  # the code raised (or the sandbox crashed)
EXIT_USAGE = 2  # bad command line or unreadable input file
EXIT_TIMEOUT = 124  # the cell ran past --timeout (as coreutils' timeout)
EXIT_SETUP = 125  # dockerrepl could not set the sandbox up (as `docker run`)
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_OOM = 137  # killed for memory


class CliError(Exception):
    """A failure the user can fix; printed as ``error: message`` and ``fix: hint``."""

    def __init__(self, message: str, hint: str = "", code: int = EXIT_USAGE) -> None:
        super().__init__(message, hint, code)
        self.message = message
        self.hint = hint
        self.code = code

    def __str__(self) -> str:
        return self.message


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: stop the cell, clean up, exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
