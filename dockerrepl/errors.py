"""The exception tree of dockerrepl.

Everything the library raises on purpose derives from :class:`DockerReplError`,
so ``except DockerReplError`` catches it all. Programmer mistakes (a wrong
argument type, an impossible value) stay ``TypeError`` / ``ValueError``.

::

    DockerReplError
    ├── DockerError                 the docker CLI or engine failed
    │   ├── DockerNotFound          no docker executable on PATH
    │   ├── DockerDaemonError       the daemon is not running / not reachable
    │   ├── DockerPermissionError   permission denied on the engine's socket
    │   ├── NoSuchImage             image absent and not pullable
    │   ├── NoSuchContainer         the container is gone
    │   ├── DockerTimeout           a docker command exceeded its timeout (also TimeoutError)
    │   └── DockerCommandError      any other non-zero exit
    ├── ContainerError              the sandbox container misbehaved
    │   ├── BootstrapError          the in-container bootstrap failed to start or handshake
    │   ├── ContainerDied           the container exited while in use
    │   └── SecurityCheckError      docker inspect shows a setting was not applied
    ├── ProtocolError               a malformed or oversized frame / message
    │   └── FrameTooLarge           a length prefix above the allowed maximum
    ├── ProxyError                  the HTTP proxy could not start
    │   └── TransportUnavailable    this engine cannot reach the proxy (Podman + bridge)
    ├── LMHandlerError              the LM Handler could not start or answer
    ├── ClientError                 an LM client call failed (HTTP, decoding, retries exhausted)
    ├── ReplClosed                  the REPL was used after cleanup()
    ├── SetupCodeError              setup_code failed in the REPL (its traceback is kept)
    ├── CellTimeout                 (also TimeoutError) raised only by APIs that cannot
    │                               report a timeout in a REPLResult
    ├── WorkspacePathError          (also ValueError) a remote path escapes /workspace
    ├── SessionFileError            (also ValueError) a saved-session file is foreign,
    │                               truncated, corrupt, too large or from a newer format
    └── SnapshotLost                a snapshot can no longer be rolled back to (dropped,
                                    or its container or process is gone)

Every error keeps plain data (strings, ints) in ``args`` and survives a pickle
round trip, so it can cross process boundaries.
"""

from __future__ import annotations

__all__ = [
    "BootstrapError",
    "CellTimeout",
    "ClientError",
    "ContainerDied",
    "ContainerError",
    "DockerCommandError",
    "DockerDaemonError",
    "DockerError",
    "DockerNotFound",
    "DockerPermissionError",
    "DockerReplError",
    "DockerTimeout",
    "FrameTooLarge",
    "LMHandlerError",
    "NoSuchContainer",
    "NoSuchImage",
    "ProtocolError",
    "ProxyError",
    "ReplClosed",
    "SecurityCheckError",
    "SessionFileError",
    "SetupCodeError",
    "SnapshotLost",
    "TransportUnavailable",
    "WorkspacePathError",
]


class DockerReplError(Exception):
    """Root of every error dockerrepl raises on purpose."""


class DockerError(DockerReplError):
    """The docker CLI or engine failed.

    ``hint`` says what to do about it; ``stderr`` is the CLI's (redacted, capped) stderr.
    """

    def __init__(self, message: str, hint: str = "", stderr: str = "", returncode: int = 0) -> None:
        super().__init__(message, hint, stderr, returncode)
        self.message = message
        self.hint = hint
        self.stderr = stderr
        self.returncode = returncode

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class DockerNotFound(DockerError):
    """No ``docker`` executable could be found."""


class DockerDaemonError(DockerError):
    """The docker daemon is not running or cannot be reached."""


class DockerPermissionError(DockerError):
    """Permission denied talking to the docker daemon's socket."""


class NoSuchImage(DockerError):
    """The image is not present locally and could not be pulled."""


class NoSuchContainer(DockerError):
    """The container does not exist (any more)."""


class DockerTimeout(DockerError, TimeoutError):
    """A docker command did not finish within its timeout."""


class DockerCommandError(DockerError):
    """A docker command failed for a reason with no more specific class."""


class ContainerError(DockerReplError):
    """The sandbox container misbehaved."""


class BootstrapError(ContainerError):
    """The in-container bootstrap failed to start or to complete its handshake."""


class ContainerDied(ContainerError):
    """The container exited while the REPL was using it, and could not be replaced."""


class SecurityCheckError(ContainerError):
    """``docker inspect`` shows that a requested security setting was not applied."""


class ProtocolError(DockerReplError):
    """A frame or message broke the protocol (bad JSON, wrong schema, bad size)."""


class FrameTooLarge(ProtocolError):
    """A frame's length prefix is above the allowed maximum."""


class ProxyError(DockerReplError):
    """The HTTP proxy could not be started or served."""


class TransportUnavailable(ProxyError):
    """The engine cannot give the container a way to the LM proxy with these options
    (Podman with ``network="bridge"``: use ``network="none"`` until the channel
    transport exists). Raised before any container starts."""


class LMHandlerError(DockerReplError):
    """The LM Handler could not be started or reached."""


class ClientError(DockerReplError):
    """An LM client call failed (HTTP error, bad response, retries exhausted)."""


class ReplClosed(DockerReplError):
    """The REPL was used after :meth:`DockerREPL.cleanup`."""


class SetupCodeError(DockerReplError):
    """The constructor's ``setup_code`` did not run to its end (an exception, a timeout).

    It is the caller's own code, so the constructor raises (after removing the
    container it started) rather than hand out a REPL set up by half.
    ``traceback`` is what the cell wrote to stderr (the traceback, among it);
    ``status`` is the cell's ``REPLResult.status`` ("error", "timeout", ...).
    """

    def __init__(self, message: str, traceback: str = "", status: str = "error") -> None:
        super().__init__(message, traceback, status)
        self.message = message
        self.traceback = traceback
        self.status = status

    def __str__(self) -> str:
        return f"{self.message}\n{self.traceback}" if self.traceback else self.message


class CellTimeout(DockerReplError, TimeoutError):
    """A cell ran past its timeout where the API cannot report it in a result."""


class WorkspacePathError(DockerReplError, ValueError):
    """A container-side path escapes ``/workspace`` (``..``, absolute path, symlink)."""


class SessionFileError(DockerReplError, ValueError):
    """A file given to :meth:`DockerREPL.resume` cannot be one: ``reason`` is one of
    ``"foreign"`` (not a dockerrepl session file), ``"truncated"``, ``"corrupt"`` (a
    checksum or an entry does not match), ``"too_large"`` (over the size cap) or
    ``"newer"`` (written by a newer format version than this dockerrepl reads);
    ``path`` is the file. The message says what is wrong."""

    def __init__(self, message: str, reason: str = "corrupt", path: str = "") -> None:
        super().__init__(message, reason, path)
        self.message = message
        self.reason = reason
        self.path = path

    def __str__(self) -> str:
        return self.message


class SnapshotLost(DockerReplError):
    """:meth:`DockerREPL.rollback` cannot go back to a snapshot: it was discarded or
    dropped (over ``max_snapshots``), its container was replaced, or the process that
    held it is gone (the kernel's OOM killer takes snapshots first). The REPL is
    unchanged. The message says which."""
