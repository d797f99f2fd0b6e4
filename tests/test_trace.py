"""``Runtime.trace``: every task's GPU work as Chrome trace JSON, from device events."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from pygpukit import InvalidArgument, InvalidArgumentType
from pygpukit.runtime import QoSPolicy, Runtime

pytestmark = pytest.mark.anyio
MiB = 1 << 20


def _slices(trace: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X"]


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def test_a_trace_records_each_task_of_each_context_from_its_events(
    rt: Runtime, tmp_path: Path
) -> None:
    g = rt.create_context("traced-g", 4 * MiB, qos=QoSPolicy.GUARANTEED)
    b = rt.create_context("traced-b", 4 * MiB, qos=QoSPolicy.BEST_EFFORT)
    xp = rt.xp

    def step(n: int) -> None:
        x = xp.ones(n)
        for _ in range(20):
            x = x * 1.0001

    path = tmp_path / "run.json"
    t_before = rt.policy.clock()
    with rt.trace(path) as trace:
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(g.submit, step, 10_000)
                tg.start_soon(b.submit, step, 100_000)
    t_after = rt.policy.clock()
    written = json.loads(path.read_text())
    assert written == json.loads(json.dumps(trace.chrome()))
    rows = {
        e["tid"]: e["args"]["name"] for e in written["traceEvents"] if e["name"] == "thread_name"
    }
    assert sorted(rows.values()) == ["traced-b (BEST_EFFORT)", "traced-g (GUARANTEED)"]
    slices = _slices(written)
    assert len(slices) == 12 and trace.dropped == 0
    assert written["otherData"]["pygpukit"] == {"tasks": 12, "dropped": 0}
    for ctx in (g, b):
        mine = sorted(
            (e for e in slices if e["args"]["context"] == ctx.name), key=lambda e: e["ts"]
        )
        assert len(mine) == 6
        assert {rows[e["tid"]] for e in mine} == {f"{ctx.name} ({ctx.qos.name})"}
        assert {e["args"]["stream"] for e in mine} == {ctx.stream.id}
        # one stream: its tasks' GPU work does not overlap (event times, 1 µs slack)
        for a, c in zip(mine, mine[1:], strict=False):
            assert a["ts"] + a["dur"] <= c["ts"] + 1.0
        for e in mine:
            # the slice spans the events the GPU time was measured between
            assert e["dur"] == pytest.approx(e["args"]["gpu_ms"] * 1e3, abs=2.0)
            assert e["args"]["outcome"] == "ok" and e["args"]["queue_wait_ms"] >= 0
    # device times on the policy's clock, inside the traced window
    span_s = t_after - t_before
    for e in slices:
        assert -1e-3 * 1e6 <= e["ts"] <= span_s * 1e6
    assert all(start <= end for _c, _f, start, end in trace.spans)


async def test_a_task_that_fails_is_traced_as_failed(host_rt: Runtime) -> None:
    ctx = host_rt.create_context("fails", MiB)

    def boom() -> None:
        raise ValueError("boom")

    with host_rt.trace() as trace:
        with pytest.raises(ValueError, match="boom"):
            await ctx.submit(boom)
    (e,) = _slices(trace.chrome())
    assert e["args"]["outcome"] == "failed" and e["name"].endswith("boom")


async def test_a_full_buffer_drops_the_oldest_tasks(host_rt: Runtime) -> None:
    ctx = host_rt.create_context("many", MiB)
    names = []
    with host_rt.trace(max_tasks=3) as trace:
        for i in range(5):

            def task() -> None:
                pass

            task.__qualname__ = f"task{i}"
            names.append(task.__qualname__)
            await ctx.submit(task)
    assert trace.dropped == 2
    assert [e["name"] for e in _slices(trace.chrome())] == names[2:]


async def test_a_task_waiting_in_the_queue_shows_its_wait(host_rt: Runtime) -> None:
    from pygpukit.runtime import Dispatcher, DispatcherConfig

    with Runtime(backend="host", policy=Dispatcher(DispatcherConfig(context_in_flight=1))) as rt:
        ctx = rt.create_context("queued", MiB)
        gate = threading.Event()
        with rt.trace() as trace:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ctx.submit, gate.wait, 10)
                await anyio.sleep(0.02)
                tg.start_soon(ctx.submit, _busy, 0.001)
                await anyio.sleep(0.05)
                gate.set()
        first, second = sorted(_slices(trace.chrome()), key=lambda e: e["ts"])
        assert first["args"]["queue_wait_ms"] < 20
        assert second["args"]["queue_wait_ms"] >= 40  # behind the gate
        assert second["ts"] >= first["ts"] + first["dur"] - 1.0


async def test_one_trace_at_a_time_and_bad_arguments(host_rt: Runtime) -> None:
    with host_rt.trace():
        with pytest.raises(InvalidArgument, match="already recording"), host_rt.trace():
            pass
    with host_rt.trace():  # the first one ended: a new one may start
        pass
    with pytest.raises(InvalidArgument, match="max_tasks must be a positive int"):
        host_rt.trace(max_tasks=0)
    with pytest.raises(InvalidArgumentType, match="file path or None"):
        host_rt.trace(3)  # type: ignore[arg-type]
    assert host_rt.tasks.device_clock is None and not host_rt.tasks.listeners


async def test_a_clock_that_fails_leaves_no_task_waiting(host_rt: Runtime) -> None:
    class Broken:
        def at(self, event: Any) -> float:
            raise RuntimeError("the device went away")

    ctx = host_rt.create_context("untimed", MiB)
    host_rt.tasks.device_clock = Broken()  # type: ignore[assignment]
    try:
        with anyio.fail_after(10):
            assert await ctx.submit(lambda: 7) == 7
    finally:
        host_rt.tasks.device_clock = None
    u = ctx.usage()
    assert (u.tasks, u.in_flight, u.gpu_time_s) == (1, 0, 0.0)
