"""Budgets are enforced at allocation; reservations follow the tier."""

from __future__ import annotations

import bisect
import gc
import operator
import threading
from typing import Any

import pytest

from pygpukit import (
    MB,
    AdmissionRejected,
    QoSPolicy,
    VRAMBudgetExceeded,
    context_session,
)
from pygpukit._locks import BookkeepingLock, give_back
from pygpukit.lowlevel import PartitionConfig, PartitionLimits, PartitionManager
from pygpukit.runtime import Runtime, _book
from pygpukit.runtime._backends._arena import Arena


@pytest.fixture(params=["native book", "python book"], autouse=True)
def book(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every budget test with the ledger on the C book and on its Python fallback (the
    one used where the extension is not built; host backend only)."""
    if request.param == "python book":
        params = getattr(request.node, "callspec", None)
        if params is not None and params.params.get("backend") == "cuda":
            pytest.skip("the Python book is the fallback of machines without the extension")
        monkeypatch.setattr(_book, "native", None)
    elif _book.native is None:
        pytest.skip("the native extension is not built")
    return str(request.param)


def test_allocation_past_max_vram_is_refused_after_asking_handlers(rt: Runtime) -> None:
    ctx = rt.create_context("small", max_vram=4 * MB)
    calls: list[tuple[object, int, int]] = []

    def handler(c: object, requested: int, available: int) -> bool:
        calls.append((c, requested, available))
        return True  # even a yes cannot lift a context past max_vram

    rt.on_memory_pressure(handler)
    with context_session(ctx):
        keep = rt.xp.empty(3 * MB, dtype="uint8")
        before = ctx.usage()
        with pytest.raises(
            VRAMBudgetExceeded,
            match=r"^context 'small' asked for 2 MiB but only 1 MiB is available within its "
            r"budget of 4 MiB \(past max_vram\); free arrays, allocate less, or create the "
            r"context with a larger max_vram$",
        ) as info:
            rt.xp.empty(2 * MB, dtype="uint8")
        err = info.value
        assert (err.context, err.requested, err.available, err.budget) == (
            "small",
            2 * MB,
            1 * MB,
            4 * MB,
        )
        assert isinstance(err, MemoryError)
        assert calls == [(ctx, 2 * MB, 1 * MB)]
        after = ctx.usage()
        assert (after.used, after.held) == (before.used, before.held)
        del keep
    assert ctx.usage().used == 0
    assert ctx.usage().peak == 3 * MB


def test_a_handler_saying_no_rejects_at_once(rt: Runtime) -> None:
    rt.on_memory_pressure(lambda c, r, a: False)
    be = rt.create_context("be", max_vram=rt.ledger.capacity, qos=QoSPolicy.BEST_EFFORT)
    rt.create_context("g", max_vram=rt.ledger.capacity - 8 * MB, qos=QoSPolicy.GUARANTEED)
    with (
        context_session(be),
        pytest.raises(VRAMBudgetExceeded, match="refused to let the runtime make room"),
    ):
        rt.xp.empty(16 * MB, dtype="uint8")
    assert be.usage().held == 0


def test_guaranteed_reserves_and_others_cannot_take_it(rt: Runtime) -> None:
    before = rt.available_vram()
    g = rt.create_context("g", max_vram=before - 8 * MB, qos=QoSPolicy.GUARANTEED)
    assert rt.available_vram() == 8 * MB
    assert g.usage().reserved == before - 8 * MB
    be = rt.create_context("be", max_vram=64 * MB, qos=QoSPolicy.BEST_EFFORT)
    burst = rt.create_context("burst", max_vram=64 * MB, base_vram=4 * MB)
    assert rt.available_vram() == 4 * MB
    with context_session(be), pytest.raises(VRAMBudgetExceeded, match="BEST_EFFORT"):
        rt.xp.empty(16 * MB, dtype="uint8")
    with context_session(burst):
        ok = rt.xp.empty(8 * MB, dtype="uint8")  # 4 MiB base + 4 MiB burst
        with pytest.raises(VRAMBudgetExceeded, match="BURSTABLE"):
            rt.xp.empty(1 * MB, dtype="uint8")
        del ok
    with context_session(g):
        big = rt.xp.empty(32 * MB, dtype="uint8")  # its reservation is its own
        del big
    rt.destroy_context(g)
    rt.destroy_context(burst)
    rt.destroy_context(be)
    assert rt.available_vram() == before


def test_unreservable_guaranteed_context_is_rejected_and_leaves_nothing(rt: Runtime) -> None:
    rt.create_context("half", max_vram=rt.available_vram() // 2, qos=QoSPolicy.GUARANTEED)
    before = rt.available_vram()
    reserved = rt.ledger.reserved_total()
    with pytest.raises(
        AdmissionRejected,
        match=r"^context 'huge' was not admitted: it must reserve 513 MiB \(GUARANTEED\) but "
        r"only 512 MiB of 1 GiB is unreserved; lower its ",  # the knob: see the test below
    ):
        rt.create_context("huge", max_vram=before + MB, qos=QoSPolicy.GUARANTEED)
    assert [c.name for c in rt.contexts] == ["half"]
    assert rt.available_vram() == before
    assert rt.ledger.reserved_total() == reserved
    rt.create_context("huge", max_vram=before // 2, qos="guaranteed")  # the name is free


def test_an_unreservable_context_is_told_to_lower_its_max_vram(host_rt: Runtime) -> None:
    host_rt.create_context("half", max_vram=512 * MB, qos=QoSPolicy.GUARANTEED)
    with pytest.raises(
        AdmissionRejected,
        match=r"^context 'huge' was not admitted: it must reserve 513 MiB \(GUARANTEED\) but "
        r"only 512 MiB of 1 GiB is unreserved; lower its max_vram, use a lower tier, or release "
        r"reservations held by others$",
    ):
        host_rt.create_context("huge", max_vram=513 * MB, qos=QoSPolicy.GUARANTEED)


def test_stream_priorities_follow_the_tier(rt: Runtime) -> None:
    least, greatest = rt.device.priority_range
    g = rt.create_context("g", max_vram=MB, qos=QoSPolicy.GUARANTEED)
    b = rt.create_context("b", max_vram=MB, qos=QoSPolicy.BURSTABLE)
    e = rt.create_context("e", max_vram=MB, qos=QoSPolicy.BEST_EFFORT)
    assert g.stream.priority == greatest
    assert e.stream.priority == least
    assert min(least, greatest) <= b.stream.priority <= max(least, greatest)
    if least != greatest:
        assert g.stream.priority < b.stream.priority < e.stream.priority or (
            abs(least - greatest) == 1
        )


def test_guaranteed_memory_is_physically_taken_at_creation(rt: Runtime, backend: str) -> None:
    def pool() -> tuple[int, int]:  # (reserved, used) of the CUDA stream-ordered pool
        return rt.backend.pool_bytes() if backend == "cuda" else (0, 0)  # type: ignore[attr-defined]

    free_before, _ = rt.backend.mem_get_info()
    _, used_before = pool()
    g = rt.create_context("g", max_vram=64 * MB, qos=QoSPolicy.GUARANTEED)
    free_reserved, _ = rt.backend.mem_get_info()
    assert free_before - free_reserved >= 64 * MB  # the device really gave it up
    with context_session(g):
        x = rt.xp.empty(32 * MB, dtype="uint8")  # carved from the reservation
        free_used, _ = rt.backend.mem_get_info()
        assert abs(free_used - free_reserved) < 4 * MB
        assert g.usage().used == 32 * MB
        del x
    rt.destroy_context(g)
    # given back: to the driver, or on CUDA to the stream-ordered pool, which keeps it for
    # the next allocation of any context (tests/test_device_memory.py) but uses none of it
    reserved, used = pool()
    assert used == used_before
    assert rt.backend.mem_get_info()[0] + reserved - used >= free_before - 4 * MB


def test_a_fragmented_reservation_is_a_budget_error(rt: Runtime) -> None:
    g = rt.create_context("g", max_vram=4 * MB, qos=QoSPolicy.GUARANTEED)
    with context_session(g):
        blocks = [rt.xp.empty(512 * 1024, dtype="uint8") for _ in range(8)]  # all 4 MiB
        del blocks[::2]  # four 512 KiB holes, none adjacent
        g._pool.release_cached()  # CuPy caches freed blocks: give the holes to the arena
        with pytest.raises(VRAMBudgetExceeded, match=r"^context 'g' asked for 1 MiB .*fragmented"):
            rt.xp.empty(1 << 20, dtype="uint8")
        assert g.usage().available >= 1 << 20  # the budget had room; the layout did not
        del blocks


# -- give-backs from garbage-collection finalizers --------------------------------------


def test_a_give_back_inside_a_bookkeeping_lock_waits_until_the_thread_holds_none() -> None:
    """A finalizer can run in the middle of a critical section (a collection started by an
    allocation there): its give-back must neither deadlock nor run inside the half-done
    update; it runs when the thread lets go of its last bookkeeping lock."""
    applied: list[int] = []
    outer, inner = BookkeepingLock(), BookkeepingLock(reentrant=True)

    def unuse(n: int) -> None:  # takes the lock the thread is inside of
        with outer:
            applied.append(n)

    with outer:
        give_back(unuse, 1)  # what a finalizer on this thread does
        with inner, inner:
            give_back(unuse, 2)
        assert applied == []  # still inside outer
    assert applied == [1, 2]
    give_back(unuse, 3)  # no lock held: at once
    assert applied == [1, 2, 3]


def test_a_give_back_from_another_thread_waits_its_turn() -> None:
    applied: list[int] = []
    lock = BookkeepingLock()
    entered, leave = threading.Event(), threading.Event()

    def holder() -> None:
        with lock:
            entered.set()
            leave.wait(5)

    def unuse(n: int) -> None:
        with lock:
            applied.append(n)

    t = threading.Thread(target=holder)
    t.start()
    assert entered.wait(5)
    threading.Timer(0.05, leave.set).start()
    give_back(unuse, 7)  # this thread holds nothing: it takes the lock when it is free
    assert applied == [7]
    t.join(5)


def test_a_failing_give_back_is_logged_not_raised_into_the_lock_holder(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lock = BookkeepingLock()
    with lock:
        give_back(operator.truediv, 1, 0)
    assert "giving back memory failed" in caplog.text


def test_an_arena_give_from_a_finalizer_mid_take_is_applied_after(monkeypatch: Any) -> None:
    """Arena.take with a finalizer's give-back arriving while it holds the lock (as a
    collection inside it would run one): no deadlock, and the range is free afterwards."""
    arena = Arena(1024)
    first = arena.take(512)
    assert first is not None
    real_insort = bisect.insort

    def insort_then_collect(seq: list[int], x: int) -> None:  # runs under take's lock
        real_insort(seq, x)
        give_back(arena.give, first, 512)  # the finalizer of first's last array

    monkeypatch.setattr(bisect, "insort", insort_then_collect)
    second: list[int | None] = []
    t = threading.Thread(target=lambda: second.append(arena.take(256)), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "deadlocked"
    monkeypatch.setattr(bisect, "insort", real_insort)
    assert second == [512] and arena.used == 256  # first's bytes came back as take left
    assert arena.take(512) == 0


def test_a_collection_inside_a_partition_lock_frees_without_deadlock() -> None:
    """End to end: an array of a partitioned context dies in a collection that runs inside
    the partition manager's critical section; its bytes go back to the pool, the ledger
    and the partition once the section ends."""
    rt = Runtime(backend="host", vram_limit=1 << 30)
    try:
        m = PartitionManager(PartitionConfig(total_memory=rt.ledger.capacity))
        m.create_partition("inf", "Inference", PartitionLimits().memory(32 * MB).compute(0.5))
        rt.use_partitions(m)
        ctx = rt.create_context("a", max_vram=24 * MB, partition="inf")

        class Cycle:  # only the cyclic collector frees it
            pass

        def work() -> None:
            with context_session(ctx):
                c = Cycle()
                c.self = c  # type: ignore[attr-defined]
                c.arr = rt.xp.empty(MB, dtype="uint8")  # type: ignore[attr-defined]
            del c
            assert ctx.usage().used == MB
            with m._lock:  # a collection inside any partition critical section
                gc.collect()
                assert ctx.usage().used == MB  # not yet: the section is half done
            assert ctx.usage().used == 0 and m.get_partition("inf").memory_used == 0

        errors: list[BaseException] = []

        def run() -> None:
            try:
                work()
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "deadlocked"
        if errors:
            raise errors[0]
    finally:
        rt.close()


def test_thousands_of_give_backs_queued_in_one_section_all_run() -> None:
    """Each queued give-back takes and lets go of locks itself: running the queue must not
    nest a new drain per item (that recursed past Python's limit and lost give-backs)."""
    applied: list[int] = []
    lock = BookkeepingLock()

    def unuse(n: int) -> None:
        with lock:
            applied.append(n)

    with lock:
        for i in range(5000):
            give_back(unuse, i)
    assert applied == list(range(5000))


def test_a_collection_right_after_the_lock_is_taken_queues_its_give_back() -> None:
    """The thread counts a lock as held from before it takes it until after it lets it go:
    a collection right after the lock is taken must queue, not run, a give-back that needs
    the lock."""
    applied: list[str] = []
    lock = BookkeepingLock()
    real = threading.Lock()
    collections = ["once"]

    class CollectingLock:  # a collection runs as acquire() returns, the first time
        def acquire(self) -> bool:
            real.acquire()
            if collections:
                collections.pop()
                give_back(unuse, "given back")
            return True

        def release(self) -> None:
            real.release()

    def unuse(what: str) -> None:
        with lock:
            applied.append(what)

    lock._lock = CollectingLock()  # type: ignore[assignment]
    t = threading.Thread(target=unuse, args=("caller",), daemon=True)
    t.start()
    t.join(5)
    assert not t.is_alive(), "deadlocked"
    assert applied == ["caller", "given back"]
