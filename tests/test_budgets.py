"""Budgets are enforced at allocation; reservations follow the tier."""

from __future__ import annotations

import pytest

from pygpukit import (
    MB,
    AdmissionRejected,
    QoSPolicy,
    VRAMBudgetExceeded,
    context_session,
)
from pygpukit.runtime import Runtime


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
    with context_session(be), pytest.raises(VRAMBudgetExceeded, match="handler refused"):
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
        match=r"^context 'huge' was not admitted: needs 513 MiB reserved but only 512 MiB of "
        r"1 GiB is unreserved; release other reservations or ask for less$",
    ):
        rt.create_context("huge", max_vram=before + MB, qos=QoSPolicy.GUARANTEED)
    assert [c.name for c in rt.contexts] == ["half"]
    assert rt.available_vram() == before
    assert rt.ledger.reserved_total() == reserved
    rt.create_context("huge", max_vram=before // 2, qos="guaranteed")  # the name is free


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


def test_guaranteed_memory_is_physically_taken_at_creation(rt: Runtime) -> None:
    free_before, _ = rt.backend.mem_get_info()
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
    assert rt.backend.mem_get_info()[0] >= free_before - 4 * MB


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
