"""Under pressure, lower tiers' evictable buffers spill to host and come back intact."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import anyio
import pytest

from pygpukit import MB, AdmissionRejected, InvalidArgument, QoSPolicy, context_session
from pygpukit.runtime import Runtime
from pygpukit.runtime._evict import EvictableState

pytestmark = pytest.mark.anyio


@pytest.fixture
def small(backend: str) -> Iterator[Runtime]:
    with Runtime(backend=backend, vram_limit=64 * MB) as rt:
        yield rt


def _weights(rt: Runtime, ctx, nbytes: int):  # type: ignore[no-untyped-def]
    xp = rt.xp
    with context_session(ctx):
        n = nbytes // 4
        w = xp.empty(n, dtype=xp.float32)  # charged to ctx on both backends
        step = n // 8
        for i in range(0, n, step):  # a pattern, not zeros; one small temporary at a time
            w[i : i + step] = xp.arange(i, min(i + step, n), dtype=xp.float32)
        w *= 3  # in place: no temporaries
        w += 1
    return w


def _digest(rt: Runtime, arr) -> str:  # type: ignore[no-untyped-def]
    host = arr.get() if rt.backend.name == "cuda" else arr
    return hashlib.sha256(host.tobytes()).hexdigest()


async def test_best_effort_weights_spill_for_a_guaranteed_context_and_return_intact(
    small: Runtime,
) -> None:
    rt = small
    be = rt.create_context("be", max_vram=48 * MB, qos=QoSPolicy.BEST_EFFORT)
    w = be.evictable(_weights(rt, be, 40 * MB))
    digest = _digest(rt, w.array)
    held_before = be.usage().held
    assert held_before >= 40 * MB

    g = rt.create_context("g", max_vram=40 * MB, qos=QoSPolicy.GUARANTEED)  # needs BE's memory
    assert w.state is EvictableState.EVICTED and w.evictions == 1
    assert be.usage().held < held_before - 39 * MB
    assert g.usage().reserved == 40 * MB

    rt.destroy_context(g)  # the room comes back; BE's next task restores its weights
    total = await be.submit(lambda: float(w.array[:4].sum()))
    assert w.state is EvictableState.RESIDENT and w.restores == 1
    assert total == 1 + 4 + 7 + 10
    assert _digest(rt, w.array) == digest


async def test_a_busy_context_is_not_evicted(small: Runtime) -> None:
    rt = small
    be = rt.create_context("be", max_vram=48 * MB, qos=QoSPolicy.BEST_EFFORT)
    w = be.evictable(_weights(rt, be, 40 * MB))
    with context_session(be):  # in use: its buffers are pinned
        with pytest.raises(AdmissionRejected):
            rt.create_context("g", max_vram=40 * MB, qos=QoSPolicy.GUARANTEED)
        assert w.on_device
    rt.create_context("g", max_vram=40 * MB, qos=QoSPolicy.GUARANTEED)
    assert not w.on_device


async def test_a_buffer_referenced_elsewhere_is_not_evicted(small: Runtime) -> None:
    rt = small
    be = rt.create_context("be", max_vram=48 * MB, qos=QoSPolicy.BEST_EFFORT)
    arr = _weights(rt, be, 40 * MB)
    w = be.evictable(arr)  # the caller keeps `arr`: evicting would free nothing
    with pytest.raises(AdmissionRejected):
        rt.create_context("g", max_vram=40 * MB, qos=QoSPolicy.GUARANTEED)
    assert w.on_device
    del arr


async def test_a_burstable_burst_is_reclaimed_for_a_guaranteed_context(small: Runtime) -> None:
    rt = small
    b = rt.create_context("b", max_vram=48 * MB, base_vram=8 * MB, qos=QoSPolicy.BURSTABLE)
    base = b.evictable(_weights(rt, b, 8 * MB))
    burst = b.evictable(_weights(rt, b, 32 * MB))
    digest, base_digest = _digest(rt, burst.array), _digest(rt, base.array)
    # 64 MiB managed: 8 reserved for b, 40 held by b (32 of it burst), 24 left unreserved.
    g = rt.create_context("g", max_vram=40 * MB, qos=QoSPolicy.GUARANTEED)
    assert not burst.on_device  # the burst went to host
    assert b.usage().reserved == 8 * MB
    rt.destroy_context(g)
    with context_session(b):
        assert burst.on_device and base.on_device
        assert _digest(rt, burst.array) == digest
        assert _digest(rt, base.array) == base_digest


def test_guaranteed_contexts_have_no_evictable_buffers(small: Runtime) -> None:
    g = small.create_context("g", max_vram=8 * MB, qos=QoSPolicy.GUARANTEED)
    with pytest.raises(InvalidArgument, match=r"^context 'g' is GUARANTEED and is never evicted"):
        g.evictable(small.xp.ones(4))


async def test_allocation_pressure_evicts_best_effort_for_a_burstable_burst(small: Runtime) -> None:
    rt = small
    be = rt.create_context("be", max_vram=48 * MB, qos=QoSPolicy.BEST_EFFORT)
    w = be.evictable(_weights(rt, be, 40 * MB))
    b = rt.create_context("b", max_vram=48 * MB, qos=QoSPolicy.BURSTABLE)
    seen: list[int] = []
    rt.on_memory_pressure(lambda ctx, req, avail: seen.append(req) or True)
    with context_session(b):
        x = rt.xp.empty(40 * MB, dtype="uint8")  # only fits once BE's weights spill
        assert not w.on_device
        del x
    assert seen == [40 * MB]
    with anyio.fail_after(5):
        await be.submit(lambda: None)
    assert w.on_device


async def test_a_view_of_the_buffer_keeps_it_from_being_evicted(small: Runtime) -> None:
    rt = small
    be = rt.create_context("be", max_vram=48 * MB, qos=QoSPolicy.BEST_EFFORT)
    w = be.evictable(_weights(rt, be, 40 * MB))
    view = w.array[: 1024 * 1024]  # someone still reads part of the weights
    with pytest.raises(AdmissionRejected):
        rt.create_context("g", max_vram=40 * MB, qos=QoSPolicy.GUARANTEED)
    assert w.on_device
    del view
    rt.create_context("g", max_vram=40 * MB, qos=QoSPolicy.GUARANTEED)
    assert not w.on_device


def test_evictable_refuses_a_module_on_the_host_backend(host_rt: Runtime) -> None:
    torch = pytest.importorskip("torch")
    be = host_rt.create_context("batch", max_vram=64 * MB, qos=QoSPolicy.BEST_EFFORT)
    with pytest.raises(
        InvalidArgument, match=r"^evictable\(\) takes a torch.nn.Module on the CUDA"
    ):
        be.evictable(torch.nn.Linear(4, 4))
