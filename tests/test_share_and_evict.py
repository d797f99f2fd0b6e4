"""``Runtime(vram_share=...)`` and ``ctx.evict()``: what a process sharing a GPU with others
gets, and paging a context's buffers out on purpose."""

from __future__ import annotations

import anyio
import numpy as np
import pytest

from pygpukit import InvalidArgument, InvalidArgumentType, VRAMBudgetExceeded
from pygpukit.runtime import QoSPolicy, Runtime, context_session

pytestmark = pytest.mark.anyio
MiB = 1 << 20


def test_a_share_of_the_device_is_what_the_runtime_manages() -> None:
    with Runtime(backend="host") as whole:
        free, total = whole.backend.mem_get_info()
    with Runtime(backend="host", vram_share=0.25) as rt:
        assert rt.ledger.capacity == min(int(total * 0.25), free)
        with pytest.raises(InvalidArgument, match="exceeds what this runtime manages"):
            rt.create_context("too-big", rt.ledger.capacity + 1)


@pytest.mark.parametrize(
    ("share", "error", "match"),
    [
        (0, InvalidArgument, "more than 0 and at most 1"),
        (1.5, InvalidArgument, "more than 0 and at most 1"),
        (True, InvalidArgumentType, "must be a number"),
        ("half", InvalidArgumentType, "must be a number"),
    ],
)
def test_a_bad_share_is_refused_before_anything_is_made(
    share: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Runtime(backend="host", vram_share=share)  # type: ignore[arg-type]


def test_a_share_and_a_limit_together_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="not both"):
        Runtime(backend="host", vram_limit=MiB, vram_share=0.5)


async def test_evict_pages_out_least_recently_used_first_and_the_next_session_restores() -> None:
    with Runtime(backend="host", vram_limit=64 * MiB) as rt:
        ctx = rt.create_context("models", 48 * MiB, qos=QoSPolicy.BEST_EFFORT)
        xp = rt.xp
        async with context_session(ctx):
            old = ctx.evictable(xp.full(MiB, 7.0))  # 8 MiB
            await anyio.sleep(0.01)
            new = ctx.evictable(xp.full(MiB, 3.0))  # used last
            # inside a session nothing is evicted from under running work
            assert ctx.evict() == 0
        assert ctx.usage().held == 16 * MiB
        assert ctx.evict(1) == 8 * MiB  # the least recently used one only
        assert (old.on_device, new.on_device) == (False, True)
        assert ctx.usage().held == 8 * MiB
        assert ctx.evict() == 8 * MiB
        assert ctx.usage().held == 0 and ctx.usage().evictions == 2
        assert ctx.evict() == 0  # nothing resident
        async with context_session(ctx):
            assert old.on_device and new.on_device
            assert float(old.array[-1]) == 7.0 and float(new.array.sum()) == 3 * MiB
        with pytest.raises(InvalidArgument, match="nbytes must be positive"):
            ctx.evict(0)
        ctx.close()
        from pygpukit import ContextClosed

        with pytest.raises(ContextClosed):
            ctx.evict()


async def test_evicting_makes_room_for_a_neighbour_of_the_same_tier() -> None:
    with Runtime(backend="host", vram_limit=40 * MiB) as rt:
        a = rt.create_context("a", 32 * MiB, qos=QoSPolicy.BEST_EFFORT)
        b = rt.create_context("b", 32 * MiB, qos=QoSPolicy.BEST_EFFORT)
        async with context_session(a):
            kept = a.evictable(rt.xp.ones(3 * MiB, dtype=np.float64))  # 24 MiB
        async with context_session(b):
            with pytest.raises(VRAMBudgetExceeded):  # one tier never evicts its own
                rt.xp.ones(3 * MiB, dtype=np.float64)
        assert a.evict() == 24 * MiB
        async with context_session(b):
            assert float(rt.xp.ones(3 * MiB, dtype=np.float64).sum()) == 3 * MiB
        async with context_session(a):
            assert float(kept.array.sum()) == 3 * MiB
