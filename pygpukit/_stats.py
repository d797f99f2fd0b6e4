"""Histograms the hot paths can afford: fixed bucket bounds, one bisect and two additions
per observation, read whole by whoever asks (the Prometheus collector, ``pygpukit top``).

Counts are kept without a lock, as the runtime's other per-context counters are: a
context's tasks finish on the thread that drains completions, and only now and then
elsewhere (a task run inline on the loop thread, one failed by the watchdog or at launch),
so two writers rarely meet; when they do, one observation may be lost.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from functools import cache
from itertools import accumulate

__all__ = ("TIME_BUCKETS", "Histogram", "quantile")

#: seconds, 10 µs to 60 s: a GPU step, a queue wait, a pipeline stage and a whole request
#: each fall where two neighbouring bounds are at most 2.5 times apart
TIME_BUCKETS: tuple[float, ...] = (
    1e-5, 2.5e-5, 5e-5,
    1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
)  # fmt: skip


class Histogram:
    """Counts of observations at most each bound (``le``, as Prometheus has it), and their
    sum. ``counts[i]`` counts observations in ``(bounds[i-1], bounds[i]]``; the last one
    those above every bound."""

    __slots__ = ("bounds", "counts", "edges", "sum")

    def __init__(self, bounds: tuple[float, ...] = TIME_BUCKETS) -> None:
        self.bounds = bounds
        self.edges = _edges(bounds)  # the bounds and inf: one per count
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations at most it)`` per bucket, ``inf`` last."""
        return list(zip(self.edges, accumulate(self.counts), strict=True))


@cache
def _edges(bounds: tuple[float, ...]) -> tuple[float, ...]:
    return (*bounds, float("inf"))


def quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """The ``q`` quantile (0..1) estimated from cumulative ``(upper bound, count)`` buckets,
    interpolating linearly inside the bucket it falls in, as Prometheus's
    ``histogram_quantile`` does; ``None`` when there are no observations. A quantile in the
    last (unbounded) bucket is reported as the largest finite bound."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > lower_count:
            if bound == float("inf"):
                return lower_bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return lower_bound
