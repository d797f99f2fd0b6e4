"""Giving a device pool's unused memory back to the driver once the pool has been quiet.

The CUDA backend's stream-ordered pool keeps freed memory mapped for the next allocation
(that is what makes a restore right after a context leaves run at raw bandwidth), but
memory it keeps is out of reach of libraries that allocate from the driver themselves
(PyTorch's caching allocator, cuBLAS). One daemon thread, alive while any pool is, trims
each pool whose last allocation or free is ``idle_s`` old. A pool here is anything with
the attributes of :class:`Quiet` and a ``trim() -> bool`` (whether nothing unused is left).
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Protocol

__all__ = ("RETRIES", "IdleTrimmer", "Quiet", "trim_if_quiet")

_log = logging.getLogger("pygpukit")

RETRIES = 4  # trims after one quiet spell at most (a live block's chunk is never freed)


class Quiet(Protocol):
    busy_at: float  # monotonic time of the last allocation or free (a plain float store)
    idle_s: float  # how long it must be quiet before its unused memory goes back
    settled: float  # the busy_at its trimming is done with
    tries: int  # trims since busy_at was last settled

    def trim(self) -> bool: ...


def trim_if_quiet(pool: Quiet, now: float) -> float:
    """Trim ``pool`` if it has been quiet long enough; returns how long until it next needs
    a look. A trim that leaves unused memory (a free still queued behind its stream's work,
    or a chunk a live block keeps) is tried again after twice the wait, :data:`RETRIES`
    times at most; any new activity starts over."""
    busy = pool.busy_at
    if busy <= pool.settled:
        return pool.idle_s  # nothing since the last trim
    wait = busy + pool.idle_s * (1 << pool.tries) - now
    if wait > 0:
        return wait
    done = pool.trim()
    if busy != pool.busy_at:  # used meanwhile: a new quiet spell
        pool.tries = 0
        return pool.idle_s
    pool.tries += 1
    if done or pool.tries >= RETRIES:
        pool.settled, pool.tries = busy, 0
    return pool.idle_s


class IdleTrimmer:
    """The thread that trims quiet pools of ``pools`` (a weak set guarded by ``lock``).

    :meth:`ensure` starts it (call with ``lock`` held); it ends once ``pools`` is empty.
    """

    def __init__(
        self,
        pools: weakref.WeakSet[Quiet],
        lock: threading.Lock,
        *,
        floor_s: float = 0.05,
        ceiling_s: float = 2.0,
    ) -> None:
        self._pools = pools
        self._lock = lock
        # between looks at least floor_s, at most ceiling_s (a pool added meanwhile is
        # seen by then: nothing wakes the thread early)
        self._floor_s = floor_s
        self._ceiling_s = ceiling_s
        self.thread: threading.Thread | None = None

    def ensure(self) -> None:
        """Start the thread unless it runs (with ``lock`` held); a failure to start is
        logged, not raised: pools then keep their memory until they close."""
        if self.thread is not None:
            return
        thread = threading.Thread(target=self._run, name="pygpukit-pool-trimmer", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # interpreter shutdown, or no more threads
            _log.warning("cannot start the pool trimmer; idle pool memory stays mapped")
            return
        self.thread = thread

    def _run(self) -> None:
        try:
            while True:
                sleep = self._look()
                if sleep is None:
                    return
                time.sleep(min(max(sleep, self._floor_s), self._ceiling_s))
        finally:
            with self._lock:
                if self.thread is threading.current_thread():
                    self.thread = None

    def _look(self) -> float | None:
        """Trim what is quiet; seconds until the next look, ``None`` when no pool is left.
        (A function of its own so that no pool stays referenced while the thread sleeps.)"""
        with self._lock:
            pools = list(self._pools)
            if not pools:
                self.thread = None
                return None
        now, sleep = time.monotonic(), min(pool.idle_s for pool in pools)
        for pool in pools:
            try:
                sleep = min(sleep, trim_if_quiet(pool, now))
            except Exception:  # a faulted device: nothing to give back there
                pool.settled, pool.tries = pool.busy_at, 0
                _log.debug("trimming an idle pool failed", exc_info=True)
        return sleep
