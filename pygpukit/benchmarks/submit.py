"""Benchmark 3: CPU cost of ``ctx.submit`` for a trivial kernel, against a raw launch.

CPU time (``time.process_time``, all threads) per task over ``--n`` tasks of
``ctx.submit(launch_noop)``: awaited in batches of 256 (many in flight, the way the raw
launches are measured) and one at a time, with the default dispatcher, with inline
execution of quick functions turned on (``LauncherConfig(inline_us=100)``) and with a
completion signal per task (``LauncherConfig(batch_us=0)``: tasks launched back to back
no longer share one), each with the process's context switches per task; against
launching the same kernel directly (what any code pays) and launching it then awaiting the
stream inline. And the floor under any such scheduler: the device calls a task that is timed
and awaited needs — two timing events around the launch, a completion signal after the end
event, the elapsed time read back — made directly, in the same batches, with no scheduling;
a signal per task, and 16 tasks in a row to a signal (what the default shares at most with
its per-context cap of 16).
Each figure is the best of ``--rounds`` interleaved rounds (3), each round in a fresh runtime.

    pygpukit bench --only submit          (or: python -m pygpukit.benchmarks.submit)
"""

from __future__ import annotations

import asyncio
import functools
import resource
import time
from typing import Any

from ..runtime import LauncherConfig, QoSPolicy, Runtime
from ._common import Row, bench_main, noop_kernel

BATCH = 256  # submits awaited together (the default queue holds 1024 per context)
SHARE = 16  # tasks to a signal in the shared floor: DispatcherConfig's context_in_flight

#: What bounds a miss (``pygpukit bench --report`` prints it under the table).
BOUNDS = (
    "The floor rows are what a timed, awaited task costs in device calls alone, with no "
    "scheduler: two event records around the launch, the completion signal, the elapsed "
    "time. Made from one gathered coroutine per task, as this benchmark's callers make them, "
    "even the shared floor is at or above 15 us over raw, so no scheduler that times each "
    "task on the GPU meets the target here however little its own code costs. What the "
    "default adds above that floor is the scheduler's Python per task (the submit's checks "
    "and future, the dispatcher's order and caps, the context's entry and exit, the "
    "completion's accounting) and the hand-off to the context's launcher thread (see the "
    "context switches per task)."
)


async def _run(backend: str, n: int, rounds: int) -> dict[str, Any]:
    cpu: dict[str, float] = {}
    wall: dict[str, float] = {}
    switches: dict[str, float] = {}  # of the round with the least CPU

    def timed(name: str, since: tuple[float, float, int]) -> None:  # the best round of each
        c0, w0, s0 = since
        c, w, sw = time.process_time() - c0, time.perf_counter() - w0, _switches() - s0
        if c < cpu.get(name, c + 1):
            switches[name] = sw
        cpu[name], wall[name] = min(cpu.get(name, c), c), min(wall.get(name, w), w)

    modes = (
        ("", None),
        (", inline", LauncherConfig(inline_us=100)),
        (", signal each", LauncherConfig(batch_us=0)),  # the default before batch_us
    )
    for mode, config in [m for _ in range(rounds) for m in modes]:  # interleaved rounds
        with Runtime(backend=backend, launcher=config) as rt:  # inline is opt-in
            ctx = rt.create_context("bench", max_vram=64 << 20, qos=QoSPolicy.GUARANTEED)
            launch = noop_kernel(rt)
            stream = ctx.stream

            def task(launch: Any = launch, stream: Any = stream) -> None:
                launch(stream)

            for _ in range(50):  # warm-up: launcher thread, events, kernels
                await ctx.submit(task)
            if not mode:
                since = _mark()
                for _ in range(n):
                    launch(stream)
                await stream
                timed("raw launch", since)

                since = _mark()
                for _ in range(n):
                    launch(stream)
                    await stream
                timed("launch + await", since)

                since = _mark()
                await _floor(rt, stream, launch, n)
                timed("floor, batched", since)

                since = _mark()
                await _floor(rt, stream, launch, n, share=SHARE)
                timed("floor, batched, shared", since)

                since = _mark()
                await _floor_in_tasks(rt, stream, launch, n)
                timed("floor, batched, shared, in tasks", since)

            since = _mark()
            for _ in range(n):
                await ctx.submit(task)
            timed("submit" + mode, since)

            since = _mark()
            for i in range(0, n, BATCH):  # many at once, like the raw launches
                await asyncio.gather(*(ctx.submit(task) for _ in range(min(BATCH, n - i))))
            timed("submit, batched" + mode, since)
            device, backend_name = rt.device.name, rt.backend.name
    return {
        "device": device,
        "backend": backend_name,
        "n": n,
        "rounds": rounds,
        "cpu_us": {k: v / n * 1e6 for k, v in cpu.items()},
        "wall_us": {k: v / n * 1e6 for k, v in wall.items()},
        "switches": {k: v / n for k, v in switches.items()},
    }


def _switches() -> int:
    """Context switches of the whole process so far (every thread's: the loop's, the
    launcher's, the driver's callback thread's): each wake-up of a sleeping thread is one."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_nvcsw + usage.ru_nivcsw


def _mark() -> tuple[float, float, int]:
    return time.process_time(), time.perf_counter(), _switches()


def _took(fut: asyncio.Future[float], start: Any, end: Any, error: BaseException | None) -> None:
    try:
        if error is not None:
            raise error
        fut.set_result(start.elapsed_ms(end))
    except Exception as exc:  # the benchmark fails rather than waits forever
        fut.set_exception(exc)


def _timed_launch(
    rt: Runtime, stream: Any, launch: Any, start: Any, end: Any, held: Any, share: int
) -> tuple[asyncio.Future[float], Any]:
    """One floor task's device calls: the launch between two timing events, then its
    completion armed — a signal of its own, or (``share`` above 1) as the newest member of
    ``held`` (``CompletionBridge.hold``). Its future (the GPU time) and the batch."""
    raw = stream.raw
    raw.record(start)
    launch(stream)
    raw.record(end)
    fut = asyncio.get_running_loop().create_future()
    done = functools.partial(_took, fut, start, end)
    if share > 1:  # sent by hold() when full
        held = rt.bridge.hold(held, end, rt.backend, done, share)
    else:
        rt.bridge.on_done(end, rt.backend, done)
    return fut, held


def _event_pairs(rt: Runtime) -> list[tuple[Any, Any]]:
    new = rt.backend.create_event
    return [(new(timing=True), new(timing=True)) for _ in range(BATCH)]


async def _floor(rt: Runtime, stream: Any, launch: Any, n: int, share: int = 1) -> None:
    """What a timed, awaited task costs in device calls alone, batched like the submits:
    with a completion signal each, or ``share`` tasks in a row to one signal (as the
    dispatcher's launcher thread shares them: ``CompletionBridge.hold``)."""
    events = _event_pairs(rt)
    rt.bridge.attach()
    for i in range(0, n, BATCH):
        futures = []
        held = None
        for start, end in events[: min(BATCH, n - i)]:  # each batch ends before the next
            fut, held = _timed_launch(rt, stream, launch, start, end, held, share)
            futures.append(fut)
        rt.bridge.send(held)
        await asyncio.gather(*futures)
    _close_all(events)


async def _floor_in_tasks(rt: Runtime, stream: Any, launch: Any, n: int) -> None:
    """The shared floor as the benchmark's callers pay it: each task's device calls made in
    a coroutine of its own, gathered in batches like the submits (an asyncio task each, as
    ``gather(ctx.submit(...), ...)`` makes), ``SHARE`` to a signal; a batch still open at
    the end of a loop iteration is sent then."""
    loop = asyncio.get_running_loop()
    events = _event_pairs(rt)
    held: list[Any] = [None]

    async def one(start: Any, end: Any) -> float:
        before = held[0]
        fut, held[0] = _timed_launch(rt, stream, launch, start, end, before, SHARE)
        if held[0] is not before:  # a new batch: sent by the end of this iteration if not full
            loop.call_soon(rt.bridge.send, held[0])
        return await fut

    rt.bridge.attach()
    for i in range(0, n, BATCH):  # each batch ends before the next reuses its events
        await asyncio.gather(*(one(*pair) for pair in events[: min(BATCH, n - i)]))
    _close_all(events)


def _close_all(events: list[tuple[Any, Any]]) -> None:
    for pair in events:
        for event in pair:
            event.close()


def summary(r: dict[str, Any]) -> list[Row]:
    cpu, wall, switches = r["cpu_us"], r["wall_us"], r["switches"]
    raw = cpu["raw launch"]
    rows = [
        Row(
            "submit",
            f"floor: the device calls of a timed, awaited task (2 event records, the launch, "
            f"{what}, elapsed time), no scheduler, many in flight: CPU us per task",
            f"{cpu[key]:.1f} us (+{cpu[key] - raw:.1f} over raw launch; wall "
            f"{wall[key]:.1f} us; {switches[key]:.1f} context switches)",
            f"raw launch {raw:.1f} us",
            "(what bounds the target; no target)",
            None,
            cpu[key] / raw,
        )
        for key, what in (
            ("floor, batched", "a completion signal each"),
            ("floor, batched, shared", f"one completion signal per {SHARE} tasks"),
            (
                "floor, batched, shared, in tasks",
                f"one completion signal per {SHARE} tasks, each in a gathered coroutine",
            ),
        )
    ]
    # the default's rows also show its baseline: a completion signal per task (batch_us=0)
    each_cpu, alone_cpu = cpu["submit, batched, signal each"], cpu["submit, signal each"]
    baselines = {
        "": (
            f"; a signal per task (batch_us=0) +{each_cpu - raw:.1f} us, "
            f"{switches['submit, batched, signal each']:.1f} context switches "
            f"({cpu['submit, batched'] / each_cpu:.2f}x)",
            f"; a signal per task (batch_us=0) {alone_cpu:.1f} us, wall "
            f"{wall['submit, signal each']:.1f} us ({cpu['submit'] / alone_cpu:.2f}x)",
        ),
        ", inline": ("", ""),
    }
    for mode, label in (("", "default"), (", inline", "inline_us=100")):
        each, alone = baselines[mode]
        over = cpu["submit, batched" + mode] - raw
        rows += [
            Row(
                "submit",
                f"ctx.submit(trivial kernel), {label}, many in flight: CPU us per task over "
                "raw launch",
                f"+{over:.1f} us ({cpu['submit, batched' + mode]:.1f} us; wall "
                f"{wall['submit, batched' + mode]:.1f} us; "
                f"{switches['submit, batched' + mode]:.1f} context switches)",
                f"raw launch {raw:.1f} us" + each,
                "<=15 us over raw",
                over <= 15 if r["backend"] == "cuda" else None,
                cpu["submit, batched" + mode] / (each_cpu if not mode else raw),
            ),
            Row(
                "submit",
                f"ctx.submit(trivial kernel), {label}, one at a time: CPU us per task",
                f"{cpu['submit' + mode]:.1f} us (wall {wall['submit' + mode]:.1f} us)",
                f"launch+await inline {cpu['launch + await']:.1f} us" + alone,
                "(latency; no target)",
                None,
                cpu["submit" + mode] / (alone_cpu if not mode else cpu["launch + await"]),
            ),
        ]
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(
        argv,
        __doc__,
        [
            ("--n", {"type": int, "default": 2000}),
            ("--rounds", {"type": int, "default": 3}),
        ],
        lambda a: asyncio.run(_run(a.backend, a.n, a.rounds)),
        summary,
    )


if __name__ == "__main__":
    main()
