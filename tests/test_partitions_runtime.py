"""Partitions govern real contexts: memory limits at allocation, compute shares at dispatch."""

from __future__ import annotations

import threading
import time

import anyio
import pytest

from pygpukit import (
    MB,
    AdmissionRejected,
    InvalidArgument,
    QoSPolicy,
    VRAMBudgetExceeded,
    context_session,
)
from pygpukit.lowlevel import PartitionConfig, PartitionLimits, PartitionManager
from pygpukit.runtime import Runtime

pytestmark = pytest.mark.anyio


def _manager(rt: Runtime) -> PartitionManager:
    manager = PartitionManager(PartitionConfig(total_memory=rt.ledger.capacity))
    manager.create_partition(
        "inference", "Inference", PartitionLimits().memory(32 * MB).compute(0.5)
    )
    manager.create_partition("training", "Training", PartitionLimits().memory(64 * MB).compute(0.5))
    rt.use_partitions(manager)
    return manager


def test_a_partition_memory_limit_holds_over_all_its_contexts(rt: Runtime) -> None:
    manager = _manager(rt)
    a = rt.create_context("a", max_vram=24 * MB, partition="inference")
    b = rt.create_context("b", max_vram=24 * MB, partition="inference")
    assert manager.get_partition("inference").contexts == ("a", "b")
    with context_session(a):
        x = rt.xp.empty(20 * MB, dtype="uint8")
    with context_session(b):
        with pytest.raises(VRAMBudgetExceeded, match="memory limit of partition 'inference'"):
            rt.xp.empty(20 * MB, dtype="uint8")  # b's own budget allows it; the partition not
        y = rt.xp.empty(8 * MB, dtype="uint8")
    assert manager.get_partition("inference").memory_used == 28 * MB
    assert b.usage().held == 8 * MB
    del x, y
    # The partition is charged what its contexts hold (CuPy keeps freed blocks cached)...
    assert manager.get_partition("inference").memory_used == a.usage().held + b.usage().held
    rt.destroy_context(a)  # ...and destroying a context gives its cache back
    assert manager.get_partition("inference").contexts == ("b",)
    assert manager.get_partition("inference").memory_used == b.usage().held


def test_unknown_partition_and_missing_manager(rt: Runtime) -> None:
    with pytest.raises(
        InvalidArgument, match=r"call use_partitions\(PartitionManager\(\.\.\.\)\) first"
    ):
        rt.create_context("a", max_vram=MB, partition="inference")
    _manager(rt)
    with pytest.raises(InvalidArgument):
        rt.create_context("a", max_vram=MB, partition="nope")
    assert rt.contexts == ()
    assert rt.ledger.reserved_total() == 0


def test_contexts_reserve_in_the_ledger_once(rt: Runtime) -> None:
    """A context's reservation is kept in one place, the ledger, and given back with it."""
    g = rt.create_context("g", max_vram=64 * MB, qos=QoSPolicy.GUARANTEED)
    b = rt.create_context("b", max_vram=64 * MB, base_vram=16 * MB)
    e = rt.create_context("e", max_vram=64 * MB, qos=QoSPolicy.BEST_EFFORT)
    assert rt.ledger.reserved_total() == 80 * MB
    assert [c.usage().reserved for c in (g, b, e)] == [64 * MB, 16 * MB, 0]
    assert (g.max_vram, b.max_vram, b.base_vram) == (64 * MB, 64 * MB, 16 * MB)
    with pytest.raises(AdmissionRejected):
        rt.create_context("big", max_vram=rt.available_vram() + MB, qos="guaranteed")
    assert rt.ledger.reserved_total() == 80 * MB  # the refused one left nothing
    for ctx in (g, b, e):
        rt.destroy_context(ctx)
    assert rt.ledger.reserved_total() == 0


async def test_compute_share_holds_back_a_partition_over_its_share(host_rt: Runtime) -> None:
    rt = host_rt
    manager = PartitionManager(PartitionConfig(total_memory=rt.ledger.capacity), window_s=5.0)
    manager.create_partition("hog", "Hog", PartitionLimits().memory(32 * MB).compute(0.2))
    manager.create_partition("fair", "Fair", PartitionLimits().memory(32 * MB).compute(0.8))
    rt.use_partitions(manager)
    hog = rt.create_context("hog", max_vram=MB, partition="hog")
    fair = rt.create_context("fair", max_vram=MB, partition="fair")
    order: list[str] = []
    lock = threading.Lock()

    def step(ctx, ms: float) -> None:  # type: ignore[no-untyped-def]
        def run() -> None:
            time.sleep(ms / 1e3)
            with lock:
                order.append(ctx.name)

        ctx.stream.launch_host_func(run)

    from pygpukit.runtime import Dispatcher, DispatcherConfig

    # one task in flight per context, so that both partitions have work waiting at once
    assert isinstance(rt.policy, Dispatcher)
    rt.policy.config = DispatcherConfig(context_in_flight=1)
    await hog.submit(step, hog, 30)  # hog has used the GPU recently...
    await fair.submit(step, fair, 2)
    assert manager.over_share("hog")
    order.clear()
    async with anyio.create_task_group() as tg:  # ...so while both want it, fair goes first
        for _ in range(5):
            tg.start_soon(hog.submit, step, hog, 2)
        await anyio.wait_all_tasks_blocked()
        for _ in range(5):
            tg.start_soon(fair.submit, step, fair, 2)
    assert sorted(order) == ["fair"] * 5 + ["hog"] * 5  # nobody starved
    fair_done = max(i for i, n in enumerate(order) if n == "fair")
    hogs = [i for i, n in enumerate(order) if n == "hog"]
    # At most the one hog task launched while the GPU was otherwise idle beats fair's work.
    assert hogs[1] > fair_done, order
    assert manager.get_partition("hog").gpu_time_s > 0.03
