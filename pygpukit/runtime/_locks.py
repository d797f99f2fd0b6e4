"""A lock for bookkeeping that garbage-collection finalizers give back to.

Memory is given back from ``weakref.finalize`` callbacks when the last array over it dies.
Those run wherever the collector happens to run: on any thread, and on the same thread in
the middle of a critical section of the very lock they need (any allocation of a tracked
object inside it can start a collection). A plain lock deadlocks there; a reentrant one
lets the give-back run inside a half-done update.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from typing import Any

__all__ = ("FinalizerSafeLock",)


class FinalizerSafeLock:
    """``with lock:`` guards the bookkeeping; :meth:`later` (safe in a finalizer) queues a
    call of ``apply(*args)`` that runs under the lock — at once if the lock is free, else
    when its holder (this thread or another) leaves it. Entering the lock applies what is
    queued first, so a critical section sees every give-back that finished before it.
    """

    __slots__ = ("_apply", "_lock", "_queued")

    def __init__(self, apply: Callable[..., None]) -> None:
        self._apply = apply
        self._lock = threading.Lock()
        self._queued: collections.deque[tuple[Any, ...]] = collections.deque()

    def __enter__(self) -> None:
        self._lock.acquire()
        try:
            self._drain()
        except BaseException:
            self._lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        self.settle()  # what a finalizer queued while this thread held the lock

    def later(self, *args: Any) -> None:
        """Queue ``apply(*args)``; never blocks (``deque.append`` is atomic)."""
        self._queued.append(args)
        self.settle()

    def settle(self) -> None:
        """Apply what is queued, unless someone holds the lock (they will, on leaving).

        A queued call is seen either by the thread that queued it (the holder had left) or
        by the holder, which checks again after it lets go.
        """
        while self._queued and self._lock.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self._lock.release()

    def _drain(self) -> None:
        queued, apply = self._queued, self._apply
        while queued:
            apply(*queued.popleft())
