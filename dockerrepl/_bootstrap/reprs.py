"""Bounded reprs: how ``locals`` shows a value (at most about ``repr_cap`` characters,
big strings and containers sliced before ``repr``, a broken ``__repr__`` never fatal).

The host imports this module too: the DSPy integration compares a variable's repr in
``locals`` with the one it expects, to see whether cell code changed it.
"""

from __future__ import annotations

import reprlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["bounded_repr"]


class _BoundedRepr(reprlib.Repr):
    def __init__(self, cap: int) -> None:
        reprlib.Repr.__init__(self)
        self.maxlevel = 3
        self.maxtuple = self.maxlist = self.maxarray = self.maxdeque = 30
        self.maxdict = 20
        self.maxset = self.maxfrozenset = 30
        self.maxstring = cap
        self.maxlong = cap
        self.maxother = cap
        # characters still to show: the text is cut at ``cap`` anyway, so elements past
        # it are "..." rather than repr'd (20 lists of 30 ints each cost ~1 ms a cell)
        self.budget = cap

    def repr1(self, x: Any, level: int) -> str:
        if self.budget <= 0:
            return "..."
        s = reprlib.Repr.repr1(self, x, level)
        self.budget -= len(s)
        return s

    # reprlib sorts sets, an O(n log n) cost per cell on big sets: show them unsorted
    def repr_set(self, x: set[Any], level: int) -> str:
        return self._unsorted(x, level, "{", "}", self.maxset, "set()")

    def repr_frozenset(self, x: frozenset[Any], level: int) -> str:
        return self._unsorted(x, level, "frozenset({", "})", self.maxfrozenset, "frozenset()")

    def _unsorted(
        self, x: set[Any] | frozenset[Any], level: int, left: str, right: str, maxn: int, empty: str
    ) -> str:
        if not x:
            return empty
        if level <= 0:
            return left + "..." + right
        import itertools

        pieces = [self.repr1(e, level - 1) for e in itertools.islice(x, maxn)]
        if len(x) > maxn:
            pieces.append("...")
        return left + ", ".join(pieces) + right

    # reprlib sorts a dict's keys too (~1 ms per cell next to a 5,500-key dict): show
    # the first ones in insertion order, as repr() does
    def repr_dict(self, x: dict[Any, Any], level: int) -> str:
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        import itertools

        pieces = []
        for k in itertools.islice(x, self.maxdict):
            if self.budget <= 0:
                break
            pieces.append("%s: %s" % (self.repr1(k, level - 1), self.repr1(x[k], level - 1)))
        if len(x) > len(pieces):
            pieces.append("...")
        return "{" + ", ".join(pieces) + "}"

    def repr_instance(self, x: object, level: int) -> str:
        return repr(x)

    # reprlib has no method for these: an element was repr'd whole (a list of 1 MB
    # bytearrays cost ~0.5 s per cell in ``locals``, checkpoints off)
    def repr_bytes(self, x: bytes, level: int) -> str:
        return _sliced(x, self.maxstring)

    def repr_bytearray(self, x: bytearray, level: int) -> str:
        return _sliced(x, self.maxstring)


def _sliced(value: str | bytes | bytearray, cap: int) -> str:
    if len(value) > cap:
        # escapes (\x00, \U000e0001) make a repr up to 10x longer than its text
        return repr(value[:cap])[:cap] + "... (%d total)" % len(value)
    return repr(value)


def bounded_repr(value: object, cap: int) -> str:
    """``repr(value)`` in at most about ``cap`` characters; never raises (but for
    KeyboardInterrupt and SystemExit)."""
    try:
        if isinstance(value, (str, bytes, bytearray)):
            s = _sliced(value, cap)
            if len(value) > cap:
                return s
        elif isinstance(value, (list, tuple, dict, set, frozenset)):
            s = _BoundedRepr(cap).repr(value)
        else:
            s = repr(value)
        if not isinstance(s, str):
            s = "<%s with a non-str __repr__>" % type(value).__name__
    except BaseException as e:  # a broken __repr__ must not fail the cell
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        s = "<%s object; repr failed: %s: %s>" % (
            type(value).__name__[:200],
            type(e).__name__[:200],
            str(e)[:200],
        )
    if len(s) > cap:
        s = s[:cap] + "... (%d chars)" % len(s)
    return s
