"""The container's entry point: ``from dockerrepl_bootstrap.main import main; main()``."""

from __future__ import annotations

import errno
import os
import signal

from .hardening import set_dumpable
from .supervisor import Supervisor


def main() -> None:
    # before anything else: cell code must never find this process reachable
    nondumpable = set_dumpable(False)
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # interrupts are for the worker
    supervisor = Supervisor(nondumpable)
    try:
        supervisor.oom.suspected()  # record the baseline count
    except Exception:
        pass
    try:
        supervisor.run()
    except BrokenPipeError:
        os._exit(0)
    except OSError as e:
        if e.errno == errno.EPIPE:
            os._exit(0)
        raise
