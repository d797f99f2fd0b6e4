"""The CUDA backend's device memory: a stream-ordered pool whose frees wait for nobody and
whose memory, once a context gives it back, serves the next allocation of any context
without going through the driver again (docs/adr/0024)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import CUDA

from pygpukit import QoSPolicy, context_session
from pygpukit.benchmarks._common import busy_kernel
from pygpukit.runtime import Runtime

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU")]

MiB = 1 << 20


def _leave_unused(rt: Runtime, nbytes: int) -> None:
    """Allocate, write and free ``nbytes`` in a context of ``rt``, and give the block back
    from the context's cache: the pool keeps it, unused."""
    ctx = rt.create_context("unused", max_vram=2 * nbytes, base_vram=0)
    with context_session(ctx):
        x = rt.xp.empty(nbytes, dtype=rt.xp.uint8)
        x.fill(1)
        del x
    ctx._pool.release_cached()
    ctx.stream.synchronize()
    reserved, used = rt.backend.pool_bytes()
    assert reserved - used >= nbytes  # kept for the next allocation


def test_giving_memory_back_does_not_wait_for_another_contexts_work() -> None:
    with Runtime(backend="cuda", vram_limit=1 << 30) as rt:
        busy = rt.create_context("busy", max_vram=64 * MiB, qos=QoSPolicy.BEST_EFFORT)
        b = rt.create_context("b", max_vram=256 * MiB, base_vram=0)
        g = rt.create_context("g", max_vram=128 * MiB, qos=QoSPolicy.GUARANTEED)
        with context_session(b):
            x = rt.xp.ones(32 * MiB // 4, dtype=rt.xp.float32)
        b.stream.synchronize()
        busy_kernel(rt)(busy.stream, 0.5)  # another context's stream is busy for 0.5 s
        time.sleep(0.01)
        t0 = time.perf_counter()
        del x
        b._pool.release_cached()  # b's block goes back to the device ...
        rt.destroy_context(g)  # ... and so does a departing Guaranteed reservation
        took = time.perf_counter() - t0
        still_busy = not busy.stream.query()
        busy.stream.synchronize()
    assert still_busy, "the busy kernel ended before the frees: the test proves nothing"
    # cudaFree would have waited for the busy kernel (~0.5 s)
    assert took < 0.1, f"giving memory back took {took * 1e3:.0f} ms"


def test_a_departing_reservation_is_reused_without_the_driver() -> None:
    with Runtime(backend="cuda", vram_limit=2 << 30) as rt:
        g = rt.create_context("g", max_vram=512 * MiB, qos=QoSPolicy.GUARANTEED)
        base = g._pool._base
        lo, hi = base.ptr, base.ptr + base.size
        g_stream = g.stream.raw.cp
        reserved, _ = rt.backend.pool_bytes()
        assert reserved >= 512 * MiB
        rt.destroy_context(g)
        del base
        g_stream.synchronize()  # the free, queued on g's stream, has run
        be = rt.create_context("be", max_vram=512 * MiB, qos=QoSPolicy.BEST_EFFORT)
        with context_session(be):
            y = rt.xp.empty(256 * MiB, dtype=rt.xp.uint8)
            y.fill(1)
            assert lo <= y.data.ptr < hi, "the new allocation did not reuse g's memory"
        assert rt.backend.pool_bytes()[0] == reserved  # nothing new from the driver
        be.stream.synchronize()


def test_a_restore_copy_waits_for_the_streams_earlier_work_on_the_same_block() -> None:
    # A block freed on a stream is reused at once by that stream's next allocation (by
    # CuPy's pool and by ours): the copy into it must come after the stream's earlier
    # work, which may still write the block's previous contents.
    with Runtime(backend="cuda", vram_limit=1 << 30) as rt:
        ctx = rt.create_context("c", max_vram=256 * MiB, qos=QoSPolicy.BEST_EFFORT)
        n = 16 * MiB
        import cupy

        ones = np.frombuffer(cupy.cuda.alloc_pinned_memory(n), dtype=np.uint8, count=n)
        ones[:] = 1  # pinned, as a spilled buffer is
        with context_session(ctx):
            junk = rt.xp.empty(n, dtype=rt.xp.uint8)
            old = junk.data.ptr
            junk.fill(7)  # loads the fill kernel now: loading a module waits for the device
            busy = busy_kernel(rt)
            busy(ctx.stream, 0.001)
            ctx.stream.synchronize()
            busy(ctx.stream, 0.3)
            junk.fill(7)  # queued behind 0.3 s of work
            del junk
            restored = rt.backend.array_from_host(ones)
            assert restored.data.ptr == old, "the block was not reused: nothing to test"
            ctx.stream.synchronize()
            assert int((restored == 1).sum()) == n, "the restored copy was overwritten"


def test_closing_the_runtime_gives_the_pools_memory_back() -> None:
    import cupy

    rt = Runtime(backend="cuda", vram_limit=4 << 30)
    try:
        _leave_unused(rt, 1 << 30)
        before = cupy.cuda.runtime.memGetInfo()[0]
    finally:
        rt.close()
    after = cupy.cuda.runtime.memGetInfo()[0]
    assert after - before >= (1 << 30) * 9 // 10


def test_unused_pool_memory_goes_back_to_the_driver_once_the_pool_is_quiet(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kept while the pool is in use (the next allocation of any context maps nothing),
    given back once it has been quiet for PYGPUKIT_POOL_IDLE_S: a library that allocates
    for itself (PyTorch, cuBLAS) can have it then."""
    import cupy

    idle_s = 1.5
    monkeypatch.setenv("PYGPUKIT_POOL_IDLE_S", str(idle_s))
    nbytes = 512 * MiB
    with Runtime(backend="cuda", vram_limit=2 << 30) as rt:
        _leave_unused(rt, nbytes)
        ctx = rt.create_context("user", max_vram=64 * MiB, base_vram=0)
        kept, before = [], None
        for _ in range(6):  # in use every 0.5 s for 3 s: longer than idle_s, never quiet
            with context_session(ctx):
                x = rt.xp.empty(8 * MiB, dtype=rt.xp.uint8)
                del x
            ctx._pool.release_cached()  # a pool free: the pool was used just now
            t_used = time.monotonic()
            time.sleep(0.5)
            reserved, used = rt.backend.pool_bytes()
            free = cupy.cuda.runtime.memGetInfo()[0]
            if time.monotonic() - t_used < idle_s:  # (a stalled machine proves nothing)
                kept.append(reserved - used >= nbytes)
                before = free  # the driver's free memory while the pool still kept it
        assert kept and all(kept), "given back while the pool was in use"
        assert before is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            reserved, used = rt.backend.pool_bytes()
            if reserved - used < nbytes:
                break
            time.sleep(0.05)
        after = cupy.cuda.runtime.memGetInfo()[0]
        assert reserved - used < nbytes, "the quiet pool kept its unused memory"
        assert after - before >= nbytes * 9 // 10  # the driver has it again


def test_a_bad_pool_idle_time_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pygpukit import InvalidArgument

    for bad in ("0", "-1", "soon", "nan"):
        monkeypatch.setenv("PYGPUKIT_POOL_IDLE_S", bad)
        with pytest.raises(InvalidArgument, match="PYGPUKIT_POOL_IDLE_S must be a positive"):
            Runtime(backend="cuda", vram_limit=1 << 30)


def test_the_pool_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYGPUKIT_STREAM_ORDERED", "0")
    with Runtime(backend="cuda", vram_limit=1 << 30) as rt:
        ctx = rt.create_context("c", max_vram=64 * MiB, qos=QoSPolicy.GUARANTEED)
        with context_session(ctx):
            x = rt.xp.ones(MiB, dtype=rt.xp.float32)
            assert float(x.sum()) == MiB
        assert rt.backend.pool_bytes() == (0, 0)


def test_a_block_freed_while_its_stream_is_captured_is_freed_once_the_capture_ends() -> None:
    # A free queued on a capturing stream would become a node of the graph — and fail, the
    # block not being the graph's own: the block would be lost for good.
    from pygpukit import capture_graph

    with Runtime(backend="cuda", vram_limit=1 << 30) as rt:
        ctx = rt.create_context("c", max_vram=256 * MiB, base_vram=0)
        xp = rt.xp
        with context_session(ctx):
            y = xp.zeros(16, dtype=xp.float32)
            y += 1  # compiled before the capture
            held = [xp.ones(8 * MiB // 4, dtype=xp.float32)]
            ctx.stream.synchronize()
            _, used = rt.backend.pool_bytes()

            def step() -> None:
                held.clear()  # the 8 MiB array dies while the stream is captured ...
                ctx._pool.release_cached()  # ... and its block leaves the context's cache
                y[...] += 1

            graph = capture_graph(step)
            graph.launch()
            ctx.stream.synchronize()
            assert float(y[0]) == 2
            graph.close()
        ctx.stream.synchronize()
        _, used_after = rt.backend.pool_bytes()
    assert used_after <= used - 8 * MiB


def test_evicted_buffers_restored_at_session_entry_live_on_the_contexts_stream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cupy

    with Runtime(backend="cuda", vram_limit=96 * MiB) as rt:
        be = rt.create_context("be", max_vram=48 * MiB, qos=QoSPolicy.BEST_EFFORT)
        with context_session(be):
            w = be.evictable(rt.xp.ones(32 * MiB // 4, dtype=rt.xp.float32))
        be.stream.synchronize()
        g = rt.create_context("g", max_vram=80 * MiB, qos=QoSPolicy.GUARANTEED)
        assert not w.on_device  # spilled: 80 MiB did not fit beside it
        rt.destroy_context(g)
        streams: list[int] = []  # the current stream of each new device block
        take = rt.backend.device_memory

        def watched(nbytes: int, stream: object = None) -> object:
            streams.append(cupy.cuda.get_current_stream().ptr)
            return take(nbytes, stream)

        monkeypatch.setattr(rt.backend, "device_memory", watched)
        with context_session(be):  # the null stream is current on this thread before entry
            assert w.on_device
            assert float(w.array.sum()) == 32 * MiB // 4
        assert streams and set(streams) == {be.stream.raw.handle}


def test_only_our_own_streams_get_pool_memory() -> None:
    import cupy

    with Runtime(backend="cuda", vram_limit=1 << 30) as rt:
        _, used = rt.backend.pool_bytes()
        x = rt.xp.ones(4 * MiB, dtype=rt.xp.uint8)  # unscoped, on the null stream: it does
        assert rt.backend.pool_bytes()[1] == used  # not wait for our streams' work
        del x
        # A non-owning wrapper of one of our streams: the block is tied to the owner (kept
        # alive until the free), never to the wrapper — whose handle may be long destroyed
        # by then (that crashed the driver in a free).
        s = rt.create_stream()
        with cupy.cuda.Stream.from_external(s):  # through the CUDA stream protocol
            z = cupy.empty(8 * MiB, dtype=cupy.uint8)
        assert rt.backend.pool_bytes()[1] >= used + 8 * MiB
        handle = s.id
        s.close()
        del s
        assert handle not in rt.backend._ours  # a closed stream's handle is not ours
        del z
        rt._unscoped.release_cached()  # the free runs now, on the closed stream's handle
        assert rt.backend.pool_bytes()[1] == used


def test_a_closed_runtime_allocates_with_cudamalloc() -> None:
    import cupy

    rt = Runtime(backend="cuda", vram_limit=1 << 30)
    rt.close()
    assert not rt.backend.stream_ordered  # its pool is gone, the handle cleared
    x = cupy.ones(1 << 20, dtype=cupy.float32)  # the closed runtime is still the allocator
    assert float(x.sum()) == 1 << 20
    assert rt.backend.pool_bytes() == (0, 0)


def test_making_room_does_not_break_a_capture_in_progress() -> None:
    # Out of memory, an allocation waits for queued frees and trims the pools: it must not
    # synchronize the device while any stream captures (another runtime's included).
    from pygpukit import capture_graph

    with (
        Runtime(backend="cuda", vram_limit=1 << 30) as a,
        Runtime(backend="cuda", vram_limit=1 << 30) as b,
    ):
        ctx = a.create_context("c", max_vram=64 * MiB, base_vram=0)
        with context_session(ctx):
            y = a.xp.zeros(16, dtype=a.xp.float32)
            y += 1

            def step() -> None:
                y[...] += 1
                b.backend._make_room()  # what b's allocation does when it runs out
                a.backend._make_room()

            graph = capture_graph(step)
            graph.launch()
            ctx.stream.synchronize()
            assert float(y[0]) == 2
            graph.close()


def test_running_out_trims_every_runtimes_pool() -> None:
    with (
        Runtime(backend="cuda", vram_limit=1 << 30) as a,
        Runtime(backend="cuda", vram_limit=1 << 30) as b,
    ):
        _leave_unused(a, 256 * MiB)  # a keeps it for its next allocation ...
        b.backend._make_room()  # ... until b runs out of memory
        reserved, used = a.backend.pool_bytes()
        assert reserved - used < 256 * MiB


def test_a_new_runtime_sees_the_memory_other_runtimes_keep_unused() -> None:
    with Runtime(backend="cuda", vram_limit=1 << 30) as a:
        _leave_unused(a, 256 * MiB)
        with Runtime(backend="cuda", vram_limit=1 << 30):  # sizes itself from free memory
            reserved, used = a.backend.pool_bytes()
            assert reserved - used < 256 * MiB  # a's unused memory went back to the driver
