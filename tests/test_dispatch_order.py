"""End to end through ``ctx.submit``: queued tasks run in tier, priority, arrival order.

A first task holds its tier's only slot until the test releases it; the tasks submitted
meanwhile queue, one arrival at a time, on several contexts. Each task's function records
that it ran. The expected order is computed from the test's own data — the tier ranks
written here, each task's priority and its arrival — and the functions must run in it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator

import anyio
import pytest

from pygpukit import MB, QoSPolicy
from pygpukit.runtime import Dispatcher, DispatcherConfig, ExecutionContext, Runtime

pytestmark = pytest.mark.anyio

G, B, BE = QoSPolicy.GUARANTEED, QoSPolicy.BURSTABLE, QoSPolicy.BEST_EFFORT
TIER_RANK = {G: 0, B: 1, BE: 2}  # the order the tiers are documented to launch in

# (context, priority) of each task in the order it arrives: priorities out of arrival
# order, ties within a context and across contexts, and no context's tasks in one block.
ONE_TIER = [(1, 2), (0, 1), (2, 1), (1, 0), (0, 2), (2, 0), (1, 1), (0, 0), (2, 2), (0, 0)]


def _scheduled(config: DispatcherConfig) -> Runtime:
    """A host runtime whose dispatcher uses ``config``."""
    return Runtime(backend="host", vram_limit=1 << 30, policy=Dispatcher(config))


@pytest.fixture
def runtimes() -> Iterator[Callable[[DispatcherConfig], Runtime]]:
    made: list[Runtime] = []

    def make(config: DispatcherConfig) -> Runtime:
        made.append(_scheduled(config))
        return made[-1]

    yield make
    for rt in made:
        rt.close()


async def _queue_behind_blockers(
    blockers: list[ExecutionContext],
    tasks: list[tuple[ExecutionContext, int]],
    ran: list[int],
) -> None:
    """Submit a blocking task on each of ``blockers``, then ``tasks`` one arrival at a time
    (task ``i`` records ``i`` in ``ran`` when it runs); release the blockers once all are
    queued and return when every task has run."""
    gate = threading.Event()
    contexts = set(blockers) | {ctx for ctx, _ in tasks}

    def block() -> None:
        assert gate.wait(30), "the test never released the blockers"

    async with anyio.create_task_group() as tg:
        try:
            for ctx in blockers:
                tg.start_soon(ctx.submit, block)
                await anyio.wait_all_tasks_blocked()
                assert ctx.usage().in_flight == 1
            for i, (ctx, priority) in enumerate(tasks):
                tg.start_soon(functools.partial(ctx.submit, ran.append, i, priority=priority))
                await anyio.wait_all_tasks_blocked()  # task i is queued before i + 1 arrives
                assert sum(c.usage().queued for c in contexts) == i + 1, "a task did not queue"
            assert ran == []
        finally:
            gate.set()
    assert sum(c.usage().tasks for c in contexts) == len(blockers) + len(tasks)


def _expected(tiers: list[QoSPolicy], priorities: list[int]) -> list[int]:
    """Task indices by tier rank, then priority (lower first), then arrival."""
    return sorted(range(len(tiers)), key=lambda i: (TIER_RANK[tiers[i]], priorities[i], i))


@pytest.mark.parametrize("tier", [G, B, BE], ids=lambda t: t.value)
async def test_one_tiers_queued_tasks_run_by_priority_then_arrival(
    runtimes: Callable[[DispatcherConfig], Runtime], tier: QoSPolicy
) -> None:
    caps: dict[QoSPolicy, int | None] = {G: None, B: None, BE: None, tier: 1}
    rt = runtimes(DispatcherConfig(tier_in_flight=caps))
    base = 0 if tier is B else None
    ctxs = [rt.create_context(f"m{i}", 4 * MB, base, tier) for i in range(3)]
    ran: list[int] = []
    await _queue_behind_blockers([ctxs[0]], [(ctxs[c], p) for c, p in ONE_TIER], ran)
    expected = _expected([tier] * len(ONE_TIER), [p for _, p in ONE_TIER])
    assert expected != list(range(len(ONE_TIER)))  # the data does test something
    assert ran == expected


async def test_queued_tasks_run_by_tier_first_in_strict_mode(
    runtimes: Callable[[DispatcherConfig], Runtime],
) -> None:
    # Strict mode holds BestEffort while Guaranteed work is in flight, so the two tiers
    # share one slot: each launch picks between them, and Guaranteed must win every time
    # although the BestEffort tasks arrived first with lower priority numbers. Burstable
    # runs beside them under its own cap, in its own order.
    rt = runtimes(DispatcherConfig(tier_in_flight={G: 1, B: 1, BE: 1}, strict=True))
    made = {
        G: [rt.create_context(f"g{i}", 4 * MB, None, G) for i in range(2)],
        B: [rt.create_context(f"b{i}", 4 * MB, 0, B) for i in range(2)],
        BE: [rt.create_context(f"be{i}", 4 * MB, None, BE) for i in range(2)],
    }
    # (tier, context, priority) in arrival order
    data = [
        (BE, 0, -1),
        (B, 1, 1),
        (G, 1, 2),
        (BE, 1, -1),
        (B, 0, 0),
        (G, 0, 1),
        (BE, 0, -2),
        (G, 1, 1),
        (B, 1, 0),
        (G, 0, 2),
        (BE, 1, 0),
    ]
    tiers = [t for t, _, _ in data]
    expected = _expected(tiers, [p for _, _, p in data])
    ran: list[int] = []
    tasks = [(made[t][c], p) for t, c, p in data]
    await _queue_behind_blockers([made[G][0], made[B][0]], tasks, ran)

    def of(*wanted: QoSPolicy) -> Callable[[list[int]], list[int]]:
        return lambda order: [i for i in order if tiers[i] in wanted]

    assert of(G, BE)(ran) == of(G, BE)(expected)
    assert of(B)(ran) == of(B)(expected)
    assert of(G, BE)(expected) != of(G, BE)(sorted(expected))  # not simply arrival order
