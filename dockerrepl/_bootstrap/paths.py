"""Where the bootstrap's code and its state are.

The code (this package, and the host's dill when the image has none) is imported
from memory (see :mod:`.loader`): its modules name files under ``CODE_DIR`` that do
not exist. The state lives in the workspace, which cell code can write.
"""

from __future__ import annotations

import os

#: Where the code claims to live: this package's parent (``/opt/dockerrepl`` in a container).
CODE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Always /workspace in a container (the host passes no environment in); the
# override exists so tests can run the bootstrap under the host Python.
WORKSPACE = os.environ.get("DOCKERREPL_WORKSPACE") or "/workspace"
# writable state, apart from the (read-only) code
STATE_DIR = os.path.join(WORKSPACE, ".dockerrepl")
STATE_FILE = os.path.join(WORKSPACE, "state.dill")
META_FILE = os.path.join(STATE_DIR, "state.meta.json")
LOCK_FILE = os.path.join(STATE_DIR, "checkpoint.lock")
# held (shared) by every snapshot child from before its fork until it exits, so a
# restore can wait (exclusive) until no snapshot is still on its way
PENDING_FILE = os.path.join(STATE_DIR, "checkpoint.pending")
# The newest worker's epoch. Every checkpoint carries an order key [epoch, seq]: a
# worker takes a new epoch, above any on disk, when it starts (and when it restores),
# and numbers its snapshots in the order its namespace went through them. A write
# whose key is not above the one on disk, or whose epoch a newer worker has passed,
# is dropped, so the state on disk only ever moves forward.
EPOCH_FILE = os.path.join(STATE_DIR, "checkpoint.epoch")
# what the host sent for compaction and tools, kept in the mount so a respawned
# worker (timeout kill, crash) gets them back: neither lives in the namespace
SCAFFOLD_FILE = os.path.join(STATE_DIR, "scaffold.json")
