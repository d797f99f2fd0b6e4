"""What every pipeline's runs took, kept by pipeline name for the metrics (``observe``).

Pipelines that share a name share their statistics: a metric is labelled by name, and a
server builds each pipeline once. The table grows by one entry per name ever run.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass

from .._stats import Histogram

__all__ = ("PipelineStatistics", "pipeline_statistics", "stats_for")


class _Stats:
    __slots__ = ("elapsed_s", "first_output_s", "runs", "stage_s")

    def __init__(self) -> None:
        self.runs: Counter[str] = Counter()  # outcome -> runs
        self.stage_s: dict[str, Histogram] = {}  # stage id -> its first call to its last end
        self.first_output_s = Histogram()
        self.elapsed_s = Histogram()

    def stage(self, stage_id: str) -> Histogram:
        hist = self.stage_s.get(stage_id)
        if hist is None:
            hist = self.stage_s.setdefault(stage_id, Histogram())
        return hist


_table: dict[str, _Stats] = {}
_lock = threading.Lock()


def stats_for(name: str) -> _Stats:
    """The statistics runs of pipelines called ``name`` record into."""
    stats = _table.get(name)
    if stats is None:
        with _lock:
            stats = _table.setdefault(name, _Stats())
    return stats


@dataclass(frozen=True)
class PipelineStatistics:
    """A snapshot of one pipeline name's runs since the process started.

    :ivar runs: outcome (``ok``, ``failed``, ``cancelled``, ``deadline_exceeded``,
        ``queue_full``) → runs that ended so
    :ivar stage_s: stage id → cumulative ``(upper bound in seconds, runs)`` buckets of how
        long the stage took in a run that ended ``ok`` (from its first call's start to its
        last call's end)
    :ivar first_output_s: the same for the time to the first output item
    :ivar elapsed_s: the same for the whole run
    """

    runs: dict[str, int]
    stage_s: dict[str, tuple[list[tuple[float, int]], float]]
    first_output_s: tuple[list[tuple[float, int]], float]
    elapsed_s: tuple[list[tuple[float, int]], float]


def pipeline_statistics() -> dict[str, PipelineStatistics]:
    """Every pipeline name that ran in this process → a snapshot of its statistics (each
    histogram as its cumulative buckets and the sum of its observations)."""
    with _lock:
        table = list(_table.items())
    return {
        name: PipelineStatistics(
            runs=dict(s.runs),
            stage_s={i: (h.cumulative(), h.sum) for i, h in list(s.stage_s.items())},
            first_output_s=(s.first_output_s.cumulative(), s.first_output_s.sum),
            elapsed_s=(s.elapsed_s.cumulative(), s.elapsed_s.sum),
        )
        for name, s in table
    }
