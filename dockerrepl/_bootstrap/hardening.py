"""Keeping the supervisor out of the cell's reach, and the cell's settings out of ours.

``set_dumpable`` and ``close_fds_except`` wall the supervisor (and its host channel)
off from the worker; ``WritingConditions`` undoes, while the bootstrap writes its
own files, the umask and resource limits a cell may have set for its process.
"""

from __future__ import annotations

import os
import signal

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Collection
    from types import ModuleType
    from typing import Any

PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
# Limits a cell may have lowered for its own process (and so for the snapshot
# children it forks): too small a file size or descriptor count would make every
# checkpoint fail, silently, until a crash lost everything since the last good one.
_WRITE_LIMITS = ("RLIMIT_FSIZE", "RLIMIT_NOFILE")


def set_dumpable(flag: bool) -> bool:
    """prctl(PR_SET_DUMPABLE, flag); True if the flag now reads back as asked.

    A process that is not dumpable can be neither ptrace'd nor opened through
    /proc/<pid>/{fd,mem,environ,...} by other processes of the same uid
    unless they hold CAP_SYS_PTRACE, which ``--cap-drop ALL`` removes. The flag
    survives fork and is reset by execve. ctypes may be missing from a minimal
    image: then nothing happens and False is returned.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl.restype = ctypes.c_int
        if prctl(PR_SET_DUMPABLE, int(flag), 0, 0, 0) != 0:
            return False
        return bool(prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == int(flag))
    except Exception:
        return False


def capability_sets() -> dict[str, str] | None:
    """This process's capability sets as /proc/self/status gives them (hex strings):
    ``{"CapEff": "0000000000000000", "CapBnd": ..., ...}``; None where there is no /proc.

    Sent in the ``ready`` reply before any cell runs, so the host can check what the
    engine applied, not only what its inspect output says (Podman lists the dropped
    capabilities one by one instead of ALL).
    """
    try:
        with open("/proc/self/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    out: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            out[key] = value.strip()
    return out


def channel_shared_with_init() -> bool:
    """True when another process (a ``docker run --init`` init) holds this process's
    stdout, the host channel, and can be reached through /proc: then cell code could
    write frames through /proc/1/fd/1 whatever this process does."""
    if os.getpid() == 1:
        return False
    try:
        theirs = os.stat("/proc/1/fd/1")
        mine = os.fstat(1)
    except OSError:
        return False  # no /proc, or init is out of reach: so it is for the worker too
    return (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino)


def close_fds_except(keep: Collection[int]) -> None:
    """Close every descriptor of this process but ``keep`` (the worker, after fork)."""
    try:
        fds: Collection[int] = [int(name) for name in os.listdir("/proc/self/fd")]
    except (OSError, ValueError):
        fds = range(3, 4096)  # no /proc: the supervisor never holds more than a few
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def set_comm(name: str) -> None:
    """Name this process (``/proc/self/comm``, 15 bytes at most); best effort."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name)
    except OSError:
        pass


class WritingConditions:
    """While writing state: umask 022, the cell's soft limits raised to their hard
    limits, SIGXFSZ ignored (an oversize write fails with EFBIG instead of killing).

    A cell's ``os.umask(0o777)`` made ``state.dill`` mode 000; with ``--cap-drop
    ALL`` not even root could read it back, and the next restore lost everything.
    """

    def __enter__(self) -> WritingConditions:
        self.umask = os.umask(0o022)
        self.limits: list[tuple[ModuleType, int, int, int]] = []
        try:
            import resource
        except ImportError:
            resource = None  # type: ignore[assignment]
        for name in _WRITE_LIMITS if resource is not None else ():
            which = getattr(resource, name, None)
            if which is None:
                continue
            try:
                soft, hard = resource.getrlimit(which)
                if soft != hard:
                    resource.setrlimit(which, (hard, hard))
                    self.limits.append((resource, which, soft, hard))
            except (OSError, ValueError):
                pass
        self.xfsz: Any
        try:
            self.xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        except (AttributeError, ValueError, OSError):
            self.xfsz = None
        return self

    def __exit__(self, *exc: object) -> None:
        os.umask(self.umask)
        for resource, which, soft, hard in self.limits:
            try:
                resource.setrlimit(which, (soft, hard))
            except (OSError, ValueError):
                pass
        if self.xfsz is not None:
            try:
                signal.signal(signal.SIGXFSZ, self.xfsz)
            except (ValueError, OSError):
                pass
