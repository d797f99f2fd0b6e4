"""Benchmark 12: what watching the runtime costs a ``submit``.

CPU time (``time.process_time``, all threads) per ``ctx.submit(launch_noop)`` over ``--n``
tasks awaited in batches of 256, in four ways, interleaved round by round (``--rounds``,
each way's median round reported): with nothing watching (``off``); with the metrics
scraped by a thread every 100 ms, 150 times Prometheus's default rate (``metrics``); with
that and :meth:`Runtime.trace` recording every task (``metrics + trace``); and with that
and OpenTelemetry spans for every submit (``+ spans``: through the SDK with a batch
processor and an exporter that drops them where opentelemetry-sdk is installed, else
through the API's no-op tracer — the row says which). The per-context histograms the
metrics read are kept in every way, ``off`` included: they cannot be turned off. The
spread is how far the ``off`` rounds lie apart (max - min over their median).

And what one scrape costs with ``--contexts`` contexts (50) that have run tasks: the median
of 21 ``render()`` calls, against prometheus-client's own writer (``generate_latest`` over
:class:`~pygpukit.observe.metrics.PygpukitCollector`) where it is installed.

    pygpukit bench --only observe          (or: python -m pygpukit.benchmarks.observe)
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..observe import instrument, uninstrument
from ..observe.metrics import render
from ..runtime import Runtime
from ._common import Row, bench_main, noop_kernel

BATCH = 256
SCRAPE_S = 0.1

#: What bounds a miss (``pygpukit bench --report`` prints it under the table).
BOUNDS = (
    "The metrics cost a submit nothing but the scrapes themselves (they read counters the "
    "runtime keeps anyway): a scrape holds the GIL for its few milliseconds. A trace adds "
    "two elapsed-time reads per task on the completing thread. A span per submit is "
    "OpenTelemetry's own cost — creating, timing and handing a span to its processor — "
    "which is why spans are off until observe.instrument() is called."
)

MODES = ("off", "metrics", "metrics + trace", "+ spans")


@contextmanager
def _scraping(rt: Runtime) -> Iterator[None]:
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(SCRAPE_S):
            render(rt)

    thread = threading.Thread(target=scrape, name="bench-scraper", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _tracer_provider() -> tuple[Any, str]:
    try:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
    except ImportError:
        return None, "OpenTelemetry API, no SDK (no-op spans)"

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Drop()))
    return provider, "OpenTelemetry SDK, batch processor"


async def _round(rt: Runtime, ctx: Any, launch: Any, n: int) -> float:
    """CPU microseconds per submit over ``n`` tasks, awaited ``BATCH`` at a time."""
    c0 = time.process_time()
    for start in range(0, n, BATCH):
        await asyncio.gather(
            *(ctx.submit(launch, ctx.stream) for _ in range(min(BATCH, n - start)))
        )
    return (time.process_time() - c0) / n * 1e6


async def _scrapes(backend: str, contexts: int) -> dict[str, float]:
    """Median milliseconds of one scrape: ours, and prometheus-client's where installed."""
    with Runtime(backend=backend) as rt:
        ctxs = [rt.create_context(f"scraped{i}", 1 << 20) for i in range(contexts)]
        await asyncio.gather(*(c.submit(_nothing) for c in ctxs for _ in range(4)))
        ways: dict[str, Any] = {"pygpukit": lambda: render(rt)}
        try:
            from prometheus_client import CollectorRegistry, generate_latest

            from ..observe.metrics import PygpukitCollector

            registry = CollectorRegistry(auto_describe=False)
            registry.register(PygpukitCollector(rt))
            ways["prometheus-client"] = lambda: generate_latest(registry)
        except ImportError:
            pass
        out = {}
        for name, scrape in ways.items():
            scrape()  # warm
            took = []
            for _ in range(21):
                t0 = time.perf_counter()
                scrape()
                took.append((time.perf_counter() - t0) * 1e3)
            out[name] = statistics.median(took)
        return out


def _nothing() -> None:
    return None


async def _run(backend: str, n: int, rounds: int, contexts: int) -> dict[str, Any]:
    try:
        import opentelemetry.trace  # noqa: F401

        provider, spans = _tracer_provider()
    except ImportError:
        provider, spans = None, ""
    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    with Runtime(backend=backend) as rt:
        ctx = rt.create_context("observed", 64 << 20)
        launch = noop_kernel(rt)
        await _round(rt, ctx, launch, min(n, 2 * BATCH))  # warm up
        for _ in range(rounds):
            for mode in MODES:
                if mode == "+ spans" and not spans:
                    continue
                if mode == "off":
                    per_mode[mode].append(await _round(rt, ctx, launch, n))
                    continue
                with _scraping(rt):
                    if mode == "metrics":
                        per_mode[mode].append(await _round(rt, ctx, launch, n))
                        continue
                    with rt.trace(max_tasks=n):
                        if mode == "+ spans":
                            instrument(provider)
                        try:
                            per_mode[mode].append(await _round(rt, ctx, launch, n))
                        finally:
                            uninstrument()
        off = per_mode["off"]
        scrape = await _scrapes(backend, contexts)
        return {
            "scrape_ms": scrape,
            "contexts": contexts,
            "device": rt.device.name,
            "backend": rt.backend.name,
            "n": n,
            "rounds": rounds,
            "spans": spans,
            "cpu_us": {m: statistics.median(v) for m, v in per_mode.items() if v},
            "rounds_us": per_mode,
            "spread": (max(off) - min(off)) / statistics.median(off) if len(off) > 1 else 0.0,
        }


def summary(r: dict[str, Any]) -> list[Row]:
    cpu, spread = r["cpu_us"], r["spread"]
    base = cpu["off"]
    judged = r["backend"] == "cuda"
    rows = []
    for mode in ("metrics", "metrics + trace"):
        ratio = cpu[mode] / base
        rows.append(
            Row(
                "observe",
                f"submit CPU cost, {mode} (scraped every {SCRAPE_S * 1e3:.0f} ms)",
                f"{cpu[mode]:.1f} us ({ratio:.3f}x)",
                f"nothing watching: {base:.1f} us (rounds spread {spread:.1%})",
                "<=1.02x or within the spread",
                (ratio <= max(1.02, 1 + spread)) if judged else None,
                ratio,
            )
        )
    scrape = r["scrape_ms"]
    theirs = scrape.get("prometheus-client")
    rows.append(
        Row(
            "observe",
            f"one scrape of {r['contexts']} contexts (median of 21)",
            f"{scrape['pygpukit']:.2f} ms",
            "(prometheus-client not installed)"
            if theirs is None
            else f"prometheus-client's generate_latest: {theirs:.2f} ms",
            "<=5 ms",
            scrape["pygpukit"] <= 5 if judged else None,
            None if theirs is None else theirs / scrape["pygpukit"],
        )
    )
    if "+ spans" in cpu:
        ratio = cpu["+ spans"] / base
        rows.append(
            Row(
                "observe",
                f"submit CPU cost, metrics + trace + a span per submit ({r['spans']})",
                f"{cpu['+ spans']:.1f} us ({ratio:.3f}x)",
                f"nothing watching: {base:.1f} us",
                "(no target: spans are opt-in)",
                None,
                ratio,
            )
        )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(
        argv,
        __doc__,
        [
            ("--n", {"type": int, "default": 4096}),
            ("--rounds", {"type": int, "default": 5}),
            ("--contexts", {"type": int, "default": 50}),
        ],
        lambda a: asyncio.run(_run(a.backend, a.n, a.rounds, a.contexts)),
        summary,
    )


if __name__ == "__main__":
    main()
