"""The idle trimmer's schedule and thread (the CUDA pool it trims: test_device_memory.py)."""

from __future__ import annotations

import gc
import threading
import time
import weakref

from pygpukit.runtime._backends._idle_trim import RETRIES, IdleTrimmer, trim_if_quiet


class Pool:
    """What the trimmer needs of a pool: its activity stamps and ``trim()``, which gives
    back ``unused`` bytes (all of them unless ``stuck`` bytes cannot go)."""

    def __init__(self, idle_s: float, busy_at: float, unused: int = 100, stuck: int = 0) -> None:
        self.idle_s = idle_s
        self.busy_at = busy_at
        self.settled = busy_at - 1  # used since the last trim
        self.tries = 0
        self.unused, self.stuck = unused, stuck
        self.trims: list[float] = []

    def trim(self) -> bool:
        self.trims.append(time.monotonic())
        self.unused = self.stuck
        return self.unused == 0


def test_a_pool_is_trimmed_once_it_has_been_quiet_for_its_idle_time() -> None:
    pool = Pool(idle_s=2.0, busy_at=100.0)
    assert trim_if_quiet(pool, 101.5) == 0.5 and pool.trims == []  # not yet: 0.5 s to go
    assert trim_if_quiet(pool, 102.0) == 2.0 and len(pool.trims) == 1
    assert pool.unused == 0
    trim_if_quiet(pool, 110.0)
    assert len(pool.trims) == 1  # nothing used since: nothing to do


def test_use_postpones_the_trim_and_starts_a_new_quiet_spell() -> None:
    pool = Pool(idle_s=2.0, busy_at=100.0)
    trim_if_quiet(pool, 101.0)
    pool.busy_at = 101.5  # allocated again
    assert trim_if_quiet(pool, 102.5) == 1.0 and pool.trims == []
    trim_if_quiet(pool, 103.5)
    assert len(pool.trims) == 1


def test_memory_that_cannot_go_is_tried_again_a_bounded_number_of_times() -> None:
    """A chunk a live block keeps never goes: the trimmer tries RETRIES times, each after
    twice the wait before, then leaves the pool alone until it is used again."""
    pool = Pool(idle_s=1.0, busy_at=0.0, stuck=10)
    now, looks = 0.0, []
    for _ in range(100):
        now += trim_if_quiet(pool, now)
        looks.append(now)
    assert len(pool.trims) == RETRIES
    assert pool.settled == 0.0  # done with this quiet spell
    pool.busy_at = now  # used again: a new spell, new tries
    trim_if_quiet(pool, now + 1.0)
    assert len(pool.trims) == RETRIES + 1


def test_a_free_queued_behind_work_is_given_back_on_a_later_try() -> None:
    pool = Pool(idle_s=1.0, busy_at=0.0, stuck=10)
    trim_if_quiet(pool, 1.0)  # the free has not run yet: 10 bytes left
    assert pool.unused == 10 and pool.tries == 1
    pool.stuck = 0  # it has run
    assert trim_if_quiet(pool, 1.5) == 0.5  # the retry waits twice as long from the use
    trim_if_quiet(pool, 2.0)
    assert pool.unused == 0 and pool.tries == 0 and pool.settled == 0.0


def test_the_thread_trims_quiet_pools_and_ends_when_no_pool_is_left() -> None:
    pools: weakref.WeakSet[Pool] = weakref.WeakSet()
    lock = threading.Lock()
    trimmer = IdleTrimmer(pools, lock, floor_s=0.01, ceiling_s=0.05)  # type: ignore[arg-type]
    pool = Pool(idle_s=0.05, busy_at=time.monotonic())
    with lock:
        pools.add(pool)
        trimmer.ensure()
    thread = trimmer.thread
    assert thread is not None
    deadline = time.monotonic() + 5
    while not pool.trims and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.trims, "the quiet pool was never trimmed"
    assert pool.trims[0] - pool.busy_at >= 0.05  # not before it had been quiet long enough
    assert thread.name == "pygpukit-pool-trimmer"
    del pool
    gc.collect()
    thread.join(5)
    assert not thread.is_alive(), "the trimmer outlived every pool (it holds one)"
    assert trimmer.thread is None
    with lock:  # a later pool starts it again
        again = Pool(idle_s=0.05, busy_at=time.monotonic())
        pools.add(again)
        trimmer.ensure()
    second = trimmer.thread
    assert second is not None and second is not thread
    del again
    gc.collect()
    second.join(5)
    assert not second.is_alive()
