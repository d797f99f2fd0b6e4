"""Benchmark 2: awaited completions per second with thousands in flight.

``--n`` trivial kernels are launched round-robin on 4 streams, each followed by an awaited
completion (``bridge.on_done`` from the loop as ``await stream`` calls it, futures
gathered), with the bridge as configured (a signal per await unless ``PYGPUKIT_COALESCE``
says otherwise) and with signals shared, up to 32 waiters to one (the opt-in). Baselines in
the same run: a Python host function calling ``call_soon_threadsafe`` per kernel, and the
rate at which the same kernels and a native signal each can merely be *enqueued*, nothing
awaited. Diagnostics: the kernels alone, enqueued; the asyncio part alone (as many futures
made, resolved from one loop callback and gathered, no GPU). With the kernels-only rate
that gives the ceiling of any bridge whose signals and bookkeeping cost nothing,
``1 / (1/kernels + 1/futures)``. And, to show what the garbage collector costs at this
rate, the bridge again with ``gc`` paused for the run (not a setting pygpukit changes).

What sharing costs a waiter: ``--burst`` tasks on one stream each launch a step of
``--burst-ms`` of device time and await the stream, all at once, ``--burst-rounds`` times;
the latency of each (launch to resume), shared against a signal per await, interleaved.

    pygpukit bench --only throughput      (or: python -m pygpukit.benchmarks.throughput)
"""

from __future__ import annotations

import asyncio
import functools
import gc
import time
from typing import Any

from ..runtime import Runtime
from ._common import Row, bench_main, busy_kernel, noop_kernel, pct

UNMATCHED = 1 << 20  # a generation no slot has: the bridge ignores these signals
SHARED = 32  # the opt-in rows' PYGPUKIT_COALESCE

#: What bounds a miss (``pygpukit bench --report`` prints it under the table).
BOUNDS = (
    "With a completion signal per await, a bridge whose own bookkeeping cost nothing would "
    "reach the enqueue-only rate (a kernel launch and a native host function each) combined "
    "with the asyncio part alone (futures made, resolved from one loop callback, gathered): "
    "the ceiling row. Where that ceiling is under 100,000/s no bridge meets the target under "
    "asyncio futures. Between the bridge and its ceiling are its Python per await and the "
    "garbage collector, which traverses every pending await's objects again at this depth "
    "(the gc-paused row). With shared signals (opt-in) the host function is paid once per "
    "batch and the ceiling is the kernels and the futures alone."
)


def _resolve(fut: asyncio.Future[None], error: BaseException | None) -> None:
    fut.set_result(None)


async def _bridge(rt: Runtime, n: int, streams: list[Any]) -> float:
    loop = asyncio.get_running_loop()
    launch, bridge, backend = noop_kernel(rt), rt.bridge, rt.backend
    bridge.attach()
    futures = []
    t0 = time.perf_counter()
    for i in range(n):
        s = streams[i % len(streams)]
        launch(s)
        fut: asyncio.Future[None] = loop.create_future()
        bridge.on_done(s.raw, backend, functools.partial(_resolve, fut), share=True)
        futures.append(fut)
    await asyncio.gather(*futures)
    return n / (time.perf_counter() - t0)


async def _bridge_gc_paused(rt: Runtime, n: int, streams: list[Any]) -> float:
    enabled = gc.isenabled()
    gc.disable()
    try:
        return await _bridge(rt, n, streams)
    finally:
        if enabled:
            gc.enable()


async def _bridge_shared(rt: Runtime, n: int, streams: list[Any]) -> float:
    configured, rt.bridge.coalesce = rt.bridge.coalesce, SHARED
    try:
        return await _bridge(rt, n, streams)
    finally:
        rt.bridge.coalesce = configured


async def _python_hostfn(rt: Runtime, n: int, streams: list[Any]) -> float:
    loop = asyncio.get_running_loop()
    launch = noop_kernel(rt)
    futures = []
    t0 = time.perf_counter()
    for i in range(n):
        s = streams[i % len(streams)]
        launch(s)
        fut = loop.create_future()
        s.launch_host_func(lambda f=fut: loop.call_soon_threadsafe(f.set_result, None))
        futures.append(fut)
    await asyncio.gather(*futures)
    return n / (time.perf_counter() - t0)


async def _enqueue_only(rt: Runtime, n: int, streams: list[Any]) -> float:
    from ..runtime import COMPLETION_CAPACITY as CAPACITY

    launch, bridge = noop_kernel(rt), rt.bridge
    token = CAPACITY * UNMATCHED
    t0 = time.perf_counter()
    for i in range(n):
        s = streams[i % len(streams)]
        launch(s)
        s.raw.signal_when_done(token, bridge)
    rate = n / (time.perf_counter() - t0)
    for s in streams:
        await s
    return rate


async def _kernels_only(rt: Runtime, n: int, streams: list[Any]) -> float:
    launch = noop_kernel(rt)
    t0 = time.perf_counter()
    for i in range(n):
        launch(streams[i % len(streams)])
    rate = n / (time.perf_counter() - t0)
    for s in streams:
        await s
    return rate


async def _futures_only(rt: Runtime, n: int, streams: list[Any]) -> float:
    """Futures made, resolved from one loop callback (as a drain does) and gathered."""
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    futures = [loop.create_future() for _ in range(n)]

    def resolve_all() -> None:
        for fut in futures:
            fut.set_result(None)

    loop.call_soon(resolve_all)
    await asyncio.gather(*futures)
    return n / (time.perf_counter() - t0)


async def _burst(rt: Runtime, stream: Any, tasks: int, seconds: float) -> list[float]:
    """``tasks`` awaits of ``stream``, each after a step of its own: their latencies."""
    step = busy_kernel(rt)
    latencies: list[float] = []

    async def one() -> None:
        t0 = time.perf_counter()
        step(stream, seconds)
        await stream
        latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(one() for _ in range(tasks)))
    return latencies


async def _burst_latency(
    rt: Runtime, tasks: int, seconds: float, rounds: int
) -> dict[str, dict[str, float]]:
    stream = rt.create_stream()
    configured = rt.bridge.coalesce
    samples: dict[int, list[float]] = {SHARED: [], 1: []}
    try:
        for _ in range(rounds):  # interleaved
            for coalesce, into in samples.items():
                rt.bridge.coalesce = coalesce
                into += await _burst(rt, stream, tasks, seconds)
    finally:
        rt.bridge.coalesce = configured
        stream.close()
    return {
        "shared" if coalesce == SHARED else "a signal each": {
            "mean_us": sum(xs) / len(xs) * 1e6,
            "p50_us": pct(xs, 50) * 1e6,
            "p99_us": pct(xs, 99) * 1e6,
        }
        for coalesce, xs in samples.items()
    }


async def _run(
    backend: str, n: int, burst: int, burst_ms: float, burst_rounds: int
) -> dict[str, Any]:
    with Runtime(backend=backend) as rt:
        streams = [rt.create_stream() for _ in range(4)]
        methods = {
            "pygpukit": _bridge,
            "pygpukit, gc paused": _bridge_gc_paused,
            f"pygpukit, shared (coalesce={SHARED})": _bridge_shared,
            "hostfn+cst": _python_hostfn,
            "enqueue-only": _enqueue_only,
            "kernels-only": _kernels_only,
            "futures-only": _futures_only,
        }
        for fn in methods.values():  # warm-up
            await fn(rt, min(n, 200), streams)
        rates: dict[str, list[float]] = {name: [] for name in methods}
        for _ in range(3):  # interleaved rounds; best of three each
            for name, fn in methods.items():
                rates[name].append(await fn(rt, n, streams))
        burst_latency = await _burst_latency(rt, burst, burst_ms / 1e3, burst_rounds)
        return {
            "device": rt.device.name,
            "backend": rt.backend.name,
            "n": n,
            "coalesce": rt.bridge.coalesce,
            "per_s": {k: max(v) for k, v in rates.items()},
            "burst": {"tasks": burst, "ms": burst_ms, "latency": burst_latency},
        }


def summary(r: dict[str, Any]) -> list[Row]:
    rate = r["per_s"]
    ours, base, enq = rate["pygpukit"], rate["hostfn+cst"], rate["enqueue-only"]
    shared = rate[f"pygpukit, shared (coalesce={SHARED})"]
    # bookkeeping free: with a signal each, the enqueue-only rate and the futures alone;
    # with signals free too, the kernels and the futures alone
    futures = rate["futures-only"]
    ceiling_each = 1 / (1 / enq + 1 / futures)
    ceiling = 1 / (1 / rate["kernels-only"] + 1 / futures)
    paused = rate["pygpukit, gc paused"]
    b = r["burst"]
    lat, own = b["latency"]["shared"], b["latency"]["a signal each"]
    cuda = r["backend"] == "cuda"

    def met(x: float) -> bool | None:
        return (x >= 100_000 and x >= 0.7 * enq) if cuda else None

    configured = "a signal each" if r["coalesce"] == 1 else f"up to {r['coalesce']} to a signal"
    return [
        Row(
            "throughput",
            f"awaited completions/s, {r['n']} in flight, as configured ({configured})",
            f"{ours:,.0f}/s ({ours / enq:.0%} of enqueue-only)",
            f"Python host fn {base:,.0f}/s; enqueue-only {enq:,.0f}/s",
            ">=100,000/s and >=70% of enqueue-only",
            met(ours),
            ours / enq,
        ),
        Row(
            "throughput",
            f"the same, signals shared (opt-in: PYGPUKIT_COALESCE={SHARED})",
            f"{shared:,.0f}/s ({shared / enq:.0%} of enqueue-only; {shared / ours:.2f}x)",
            f"enqueue-only {enq:,.0f}/s (a signal per kernel)",
            ">=100,000/s and >=70% of enqueue-only",
            met(shared),
            shared / enq,
        ),
        Row(
            "throughput",
            "what bounds them (diagnostic): the ceiling with free bookkeeping, a signal "
            "each (enqueue-only + futures) / free signals too (kernels + futures)",
            f"{ceiling_each:,.0f}/s ({ours / ceiling_each:.0%} reached as configured) / "
            f"{ceiling:,.0f}/s ({shared / ceiling:.0%} reached shared)",
            f"kernels only {rate['kernels-only']:,.0f}/s; futures only {futures:,.0f}/s",
            "(no target)",
            None,
            ours / ceiling_each,
        ),
        Row(
            "throughput",
            f"what sharing costs: {b['tasks']} awaits at once on one stream, each after "
            f"{b['ms']:g} ms of work; latency mean / p99 (diagnostic)",
            f"shared {lat['mean_us']:,.0f} / {lat['p99_us']:,.0f} us",
            f"a signal each {own['mean_us']:,.0f} / {own['p99_us']:,.0f} us ("
            f"{lat['mean_us'] / own['mean_us']:.2f}x / {lat['p99_us'] / own['p99_us']:.2f}x)",
            "(no target)",
            None,
            lat["mean_us"] / own["mean_us"],
        ),
        Row(
            "throughput",
            "as configured, the garbage collector paused (diagnostic)",
            f"{paused:,.0f}/s ({paused / enq:.0%} of enqueue-only)",
            f"with gc: {ours:,.0f}/s",
            "(what gc costs; no target)",
            None,
            paused / ours,
        ),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(
        argv,
        __doc__,
        [
            ("--n", {"type": int, "default": 20_000}),
            ("--burst", {"type": int, "default": 16}),
            ("--burst-ms", {"type": float, "default": 1.0}),
            ("--burst-rounds", {"type": int, "default": 30}),
        ],
        lambda a: asyncio.run(_run(a.backend, a.n, a.burst, a.burst_ms, a.burst_rounds)),
        summary,
    )


if __name__ == "__main__":
    main()
