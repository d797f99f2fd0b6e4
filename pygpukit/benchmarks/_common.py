"""Pieces every benchmark uses: percentiles, a kernel that occupies the device for a set
time, and the summary row that ``pygpukit bench`` prints.

Every benchmark module also states, in its ``BOUNDS`` constant, what bounds the figure
when it misses its target; ``pygpukit bench --report`` prints it under the table."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..runtime import Runtime, Stream

__all__ = (
    "GcPauses",
    "Row",
    "bench_main",
    "busy_kernel",
    "noop_kernel",
    "pct",
    "per_call",
    "utc_day",
)


def pct(xs: list[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank); NaN for no samples."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def per_call(n: int, alloc: Any) -> float:
    """Seconds per call of ``alloc()`` over ``n`` calls, what it returns dropped at once
    (an allocate-and-free when it returns an array or a tensor)."""
    t0 = time.perf_counter()
    for _ in range(n):
        a = alloc()
        del a
    return (time.perf_counter() - t0) / n


def noop_kernel(rt: Runtime) -> Callable[[Stream], None]:
    """``launch(stream)`` enqueuing an empty kernel (a no-op item on the host backend)."""
    if rt.backend.name == "host":
        return lambda s: s.launch_host_func(_nothing)
    import cupy

    kernel = cupy.RawKernel(r'extern "C" __global__ void noop() {}', "noop")
    return lambda s: kernel((1,), (1,), (), stream=s.raw.cp)  # type: ignore[attr-defined]


def busy_kernel(rt: Runtime) -> Callable[..., None]:
    """``launch(stream, seconds, blocks=1, threads=1)``: occupy ``blocks`` for ``seconds``.

    On CUDA a kernel spinning on the global timer (clock-independent); on the host backend
    a stream item that sleeps.
    """
    if rt.backend.name == "host":

        def host(s: Stream, seconds: float, blocks: int = 1, threads: int = 1) -> None:
            s.launch_host_func(lambda: time.sleep(seconds))

        return host
    import cupy

    spin = cupy.RawKernel(
        r"""extern "C" __global__ void spin(long long ns) {
            long long t0, t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0)); t = t0;
            while (t - t0 < ns) { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); }
        }""",
        "spin",
    )

    def cuda(s: Stream, seconds: float, blocks: int = 1, threads: int = 1) -> None:
        spin((blocks,), (threads,), (cupy.int64(int(seconds * 1e9)),), stream=s.raw.cp)  # type: ignore[attr-defined]

    return cuda


def _nothing() -> None:
    return None


class GcPauses:
    """The garbage collector's pauses while in use (``with GcPauses() as pauses``): to tell
    whether a latency tail is the collector's. ``spans`` are ``(start, stop)`` in
    ``time.perf_counter`` seconds."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.spans.append((self._start, time.perf_counter()))

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def hits(self, intervals: Sequence[tuple[float, float]]) -> int:
        """How many of ``intervals`` (``(start, stop)``) a collection overlapped."""
        return sum(any(a < t1 and b > t0 for a, b in self.spans) for t0, t1 in intervals)

    def summary(self, intervals: Sequence[tuple[float, float]]) -> dict[str, float]:
        longest = max((b - a for a, b in self.spans), default=0.0)
        return {
            "collections": len(self.spans),
            "longest_us": longest * 1e6,
            "samples_hit": self.hits(intervals),
        }


def utc_day() -> str:
    """Today's date in UTC (``YYYY-MM-DD``): results name the day they were measured on."""
    return datetime.datetime.now(datetime.UTC).date().isoformat()


@dataclass(frozen=True)
class Row:
    """One line of the suite's summary: a figure against its baseline and target.

    :ivar value: the figure as measured, with its unit
    :ivar baseline: what it is compared with, measured in the same run
    :ivar target: the target it is held to, or ``(no target)`` in parentheses
    :ivar met: whether the target is met; ``None`` where none is judged (the host
        backend, or a diagnostic row)
    :ivar ratio: the figure against its baseline as the row's text states it (e.g. how
        many times faster than the baseline); ``None`` where the row has no single ratio
    """

    benchmark: str
    figure: str
    value: str
    baseline: str
    target: str
    met: bool | None
    ratio: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


Option = tuple[str, dict[str, Any]]


def bench_main(
    argv: list[str] | None,
    doc: str | None,
    options: Sequence[Option],
    run: Callable[[argparse.Namespace], dict[str, Any]],
    report: Callable[[dict[str, Any]], Any],
) -> dict[str, Any]:
    """The command line every benchmark module shares: ``--backend``, its own ``options``,
    ``--json``; ``report`` prints a table (or returns :class:`Row` objects to print)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backend", default="auto", help="auto, cuda or host")
    for flag, kwargs in options:
        p.add_argument(flag, **kwargs)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    result = run(args)
    result.update(python=platform.python_version(), date=utc_day())
    rows = report(result)
    for row in rows or ():
        print(f"{row.figure}: {row.value}  [{row.baseline}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
