"""Locks for the memory bookkeeping that garbage-collection finalizers give back to.

Memory is given back from ``weakref.finalize`` callbacks when the last array over it dies:
to a reservation's free list, a pool's and the backend's counters, the ledger, a
partition. Those callbacks run wherever a collection happens: on any thread, and on the
same thread in the middle of a critical section of one of the locks the give-back needs
(any allocation of a tracked object there can start a collection). A plain lock deadlocks
there; a reentrant one lets the give-back run inside a half-done update.

So the locks of that bookkeeping are :class:`BookkeepingLock`\\ s, which count per thread
how many of them it holds, and finalizers go through :func:`give_back`, which queues the
give-back; a thread that holds none of them runs the queue at once, and a thread that
holds one runs it as it lets go of its last. Whoever runs the queue runs every thread's
queued give-backs, taking their locks as any caller would (waiting its turn where another
thread holds one: no cycle, since these locks are taken in one order — the ledger's before
a partition's — and never held while waiting for anything else).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

__all__ = ("BookkeepingLock", "give_back")

_log = logging.getLogger("pygpukit")
_held = threading.local()  # .depth: bookkeeping locks this thread holds
_queued: collections.deque[tuple[Callable[..., object], tuple[Any, ...]]] = collections.deque()


class BookkeepingLock:
    """A lock (``reentrant=True``: an ``RLock``) for bookkeeping that :func:`give_back`
    updates. ``with lock:`` only."""

    __slots__ = ("_lock",)

    def __init__(self, *, reentrant: bool = False) -> None:
        self._lock: Any = threading.RLock() if reentrant else threading.Lock()

    def __enter__(self) -> None:
        # counted before it is taken and uncounted after it is let go: a collection in
        # between must see it as held (give-backs queue), never as free while it is held
        _held.depth = getattr(_held, "depth", 0) + 1
        try:
            self._lock.acquire()
        except BaseException:
            _held.depth -= 1
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self._lock.release()
        finally:
            _held.depth -= 1
        if _held.depth == 0 and _queued:
            _run_queued()  # give-backs that arrived while this thread held the lock


def give_back(fn: Callable[..., object], /, *args: Any) -> None:
    """``fn(*args)`` now, or — if this thread holds a bookkeeping lock — as soon as it holds
    none. For ``weakref.finalize`` callbacks that update the bookkeeping."""
    _queued.append((fn, args))  # atomic
    if not getattr(_held, "depth", 0):
        _run_queued()


def _run_queued() -> None:
    """Run the queued give-backs (any thread's: each takes its locks like any caller).

    Never nested: a give-back releases locks, and a drain started from there would recurse
    once per item; the drain already running on this thread picks those up instead.
    """
    if getattr(_held, "draining", False):
        return
    _held.draining = True
    try:
        while True:
            try:
                fn, args = _queued.popleft()
            except IndexError:
                return
            try:
                fn(*args)
            except Exception:  # a finalizer's failure must not surface in whoever drains
                _log.exception("giving back memory failed: %r%r", fn, args)
    finally:
        _held.draining = False
