"""dockerrepl's in-container bootstrap: supervisor + worker.

The host starts the container with ``loader`` as its ``python -c`` program and sends
this package (as ``dockerrepl_bootstrap``) over stdin; the loader imports it from
memory and runs ``main.main()`` as the container's main process. Its state
(checkpoint metadata, locks, the tools and compaction list) lives in
``/workspace/.dockerrepl``, which cell code can write; the code it runs from is in
no file a cell could change. It runs on any Python >= 3.8 with only the standard
library (dill is optional: the image's, or the host's sent with the code) and
imports nothing from the host package; the host imports ``protocol``, ``loader``'s
text, ``files``' path walk and ``reprs``' bounded repr from it, nothing else.

Modules, in the order they build on each other:

* ``protocol``: the wire contract (version, caps, names, statuses) and framing;
* ``hardening``: keeping the supervisor out of the cell's reach;
* ``paths``: where the code and the state are;
* ``reprs``: bounded reprs (of ``locals``, and of a non-JSON value);
* ``namespace``: the REPL namespace, running a cell;
* ``client``, ``scaffold``: ``llm_query`` & co, ``SHOW_VARS``, custom tools;
* ``store``, ``checkpoint``: the checkpoint on disk, and the snapshots that write it;
* ``worker``: the worker process (cells and the host's operations);
* ``files``, ``procs``, ``output``, ``report``, ``relay``, ``transfer``,
  ``supervisor``: the supervisor process (``relay`` and ``transfer``: the channel
  transport's LM calls and files);
* ``main``: the entry point; ``loader``: what runs before it.
"""

from __future__ import annotations

import importlib

from .protocol import SCAFFOLD_FUNCS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def __getattr__(name: str) -> Any:
    """The scaffold helpers under their names from before the package split
    (``dockerrepl_bootstrap.llm_query``): a checkpoint written then pickled a
    function that uses one by that name."""
    if name in SCAFFOLD_FUNCS:
        # imported here, not at the top: the host imports this package for protocol only
        return getattr(importlib.import_module(__name__ + ".scaffold"), name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
