"""Locks for the memory bookkeeping that garbage-collection finalizers give back to.

Memory is given back from ``weakref.finalize`` callbacks when the last array over it dies:
to a reservation's free list, a pool's and the backend's counters, the ledger, a
partition. Those callbacks run wherever a collection happens: on any thread, and on the
same thread in the middle of a critical section of one of the locks the give-back needs
(any allocation of a tracked object there can start a collection). A plain lock deadlocks
there; a reentrant one lets the give-back run inside a half-done update.

So the locks of that bookkeeping are :class:`BookkeepingLock`\\ s, which count per thread
how many of them it holds, and finalizers go through :func:`give_back`: it runs the
give-back at once where the thread holds none of them (taking the locks as any caller
would: from another thread it simply waits its turn), else queues it, and the thread runs
the queue as it lets go of its last one.
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
        self._lock.acquire()
        _held.depth = getattr(_held, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _held.depth -= 1
        self._lock.release()
        if _held.depth == 0 and _queued:
            _run_queued()  # give-backs that arrived while this thread held the lock


def give_back(fn: Callable[..., object], /, *args: Any) -> None:
    """``fn(*args)`` now, or — if this thread holds a bookkeeping lock — as soon as it holds
    none. For ``weakref.finalize`` callbacks that update the bookkeeping."""
    if getattr(_held, "depth", 0):
        _queued.append((fn, args))  # atomic; run by this thread when it lets go
        return
    _call(fn, args)
    if _queued:
        _run_queued()


def _run_queued() -> None:
    while True:
        try:
            fn, args = _queued.popleft()
        except IndexError:
            return
        _call(fn, args)


def _call(fn: Callable[..., object], args: tuple[Any, ...]) -> None:
    try:
        fn(*args)
    except Exception:  # a finalizer's failure must not surface in whoever runs the queue
        _log.exception("giving back memory failed: %r%r", fn, args)
