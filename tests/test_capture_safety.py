"""pygpukit's queries, timings and pool upkeep never break another thread's graph capture.

A stream or event query, a synchronization or a memory-pool trim made in CUDA's default
(global) capture mode while another thread captures a graph in global mode (what
``torch.cuda.graph`` does by default) invalidates that capture; the query itself even
returns normally (docs/adr/0031). pygpukit makes its queries, elapsed times, fault
checks and pool trims and attribute reads with the thread's mode relaxed, which is safe
for them: none of them touches the capturing stream.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import CUDA

from pygpukit.runtime import Runtime

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU")]


def test_our_queries_waits_and_pool_calls_leave_a_global_capture_intact() -> None:
    import cupy
    from cupy.cuda import runtime as cr

    with Runtime(backend="cuda", vram_limit=1 << 30) as rt:
        stream = rt.create_stream()
        start, end = rt.backend.create_event(timing=True), rt.backend.create_event(timing=True)
        stream.raw.record(start)
        stream.raw.record(end)
        stream.synchronize()
        x = cupy.zeros(1 << 20, dtype=cupy.float32)
        other = cupy.cuda.Stream(non_blocking=True)
        with other:
            cupy.add(x, 1, out=x)  # loads the kernel before the capture
        other.synchronize()
        began, finish = threading.Event(), threading.Event()
        outcome: list[str] = []

        def capture() -> None:  # someone else's capture, in global mode
            with other:
                other.begin_capture(mode=cr.streamCaptureModeGlobal)
                cupy.add(x, 1, out=x)
                began.set()
                finish.wait(20)
                try:
                    other.end_capture()
                    outcome.append("captured")
                except Exception as exc:
                    outcome.append(f"broken: {exc}")

        thread = threading.Thread(target=capture)
        thread.start()
        try:
            assert began.wait(20)
            # ours, on this thread, while the other thread captures
            assert stream.query()
            assert start.query()
            assert start.elapsed_ms(end) >= 0
            assert rt.backend.fault([stream.raw]) is None
            rt.backend.pool_bytes()
            rt.backend._pool.trim()  # type: ignore[attr-defined]

            async def await_it() -> None:
                stream.launch_host_func(lambda: None)
                await stream  # a lone waiter: queries first, then sleeps on the bridge

            asyncio.run(await_it())
        finally:
            finish.set()
            thread.join(20)
        assert outcome == ["captured"]
