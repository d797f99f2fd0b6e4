"""The benchmark suite: every figure against a baseline measured in the same run.

``pygpukit bench [--only NAME,...] [--json FILE] [--quick]`` runs them and prints a table of
each figure, its baseline, its target and whether it is met (targets apply on CUDA only;
the host backend runs the same code with small sizes so nothing rots). Each benchmark is
also a module with its own ``main`` (``python -m pygpukit.benchmarks.NAME --help``).

=============  =======================================================================
completion     1: await a trivial kernel (p50/p99, asyncio and uvloop), idle CPU
throughput     2: awaited completions per second with thousands in flight
submit         3: CPU cost of ctx.submit over a raw launch
models         4 and 6: event-loop lag while four models run; four models concurrently
isolation      5: a Guaranteed step under a BestEffort flood vs equal priorities
alloc          7: budgeted, routed allocate/free vs the raw CuPy pool
eviction       8: BestEffort spill and restore bandwidth vs raw pinned copies
stages         9: framework overhead per pipeline stage
torch_memory   10: PyTorch allocation in a context vs its own allocator; binding cost
torch_models   11: four PyTorch models decoding at once; a Guaranteed step under a flood
observe        12: submit cost with metrics scraped, a trace recording, spans on
=============  =======================================================================

The JSON describes its run (:func:`pygpukit.benchmarks.report.environment`: device,
backend, versions, day and commit) and holds every row and every benchmark's ``BOUNDS``,
so ``pygpukit bench --report bench.json`` renders the results page from it alone.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from typing import Any

from ._common import Row

__all__ = ("FULL", "NAMES", "QUICK", "Row", "dump", "run_suite")

NAMES = (
    "completion",
    "throughput",
    "submit",
    "models",
    "isolation",
    "alloc",
    "eviction",
    "stages",
    "torch_memory",
    "torch_models",
    "observe",
)

FULL: dict[str, list[str]] = {name: [] for name in NAMES}
QUICK: dict[str, list[str]] = {
    "completion": ["--n", "40", "--warmup", "4", "--loops", "asyncio"],
    "throughput": ["--n", "400", "--burst", "4", "--burst-ms", "0.2", "--burst-rounds", "2"],
    "submit": ["--n", "100", "--rounds", "1"],
    "models": ["--tokens", "8", "--rounds", "1", "--size", "small"],
    "isolation": ["--samples", "8", "--block-us", "100", "--waves", "5", "--gap-ms", "1"],
    "alloc": ["--n", "500"],
    "eviction": ["--gib", "0.03125", "--cycles", "2"],
    "stages": ["--n", "50"],
    "torch_memory": ["--n", "200"],
    "torch_models": ["--tokens", "8", "--samples", "8"],
    "observe": ["--n", "512", "--rounds", "2"],
}


def run_suite(
    only: list[str] | None = None,
    *,
    backend: str = "auto",
    quick: bool = False,
    after_each: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the benchmarks named in ``only`` (all by default) and print their rows.

    :param only: benchmark names (:data:`NAMES`), in the order to run them
    :param backend: ``auto``, ``cuda`` or ``host``
    :param quick: small sizes (a smoke test; nothing is judged on the host backend anyway)
    :param after_each: called with the run so far after each benchmark (the CLI writes the
        JSON there, so that a run cut short keeps what it measured)
    :return: the run, self-described: ``environment`` (device, backend, versions, day,
        commit), ``command``, each benchmark's ``results``, the ``summary`` rows and each
        benchmark's ``bounds`` (what bounds a miss)
    :raises InvalidArgument: an unknown benchmark name
    """
    from .report import environment

    names = list(only or NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        from .._exceptions import InvalidArgument

        raise InvalidArgument(f"unknown benchmark(s) {unknown}; choose from {list(NAMES)}")
    env = environment(backend)
    command = ["pygpukit bench"]
    if backend != "auto":
        command.append(f"--backend {backend}")
    if only:
        command.append(f"--only {','.join(names)}")
    if quick:
        command.append("--quick")
    results: dict[str, Any] = {}
    bounds: dict[str, str] = {}
    rows: list[Row] = []
    run: dict[str, Any] = {
        "environment": env,
        "command": " ".join(command),
        "results": results,
        "summary": [],
        "bounds": bounds,
    }
    for name in names:
        module = importlib.import_module(f".{name}", __name__)
        print(f"== {name} ==", flush=True)
        args = ["--backend", backend, *(QUICK if quick else FULL)[name]]
        results[name] = module.main(args)
        rows += module.summary(results[name])
        bounds[name] = module.BOUNDS
        run["summary"] = [r.as_dict() for r in rows]
        if after_each is not None:
            after_each(run)
    print_rows(rows)
    return run


def print_rows(rows: list[Row]) -> None:
    print("\n| benchmark | figure | value | baseline (same run) | target | met |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        print(f"| {r.benchmark} | {r.figure} | {r.value} | {r.baseline} | {r.target} | {met} |")


def dump(result: dict[str, Any], path: str) -> None:
    """Write a :func:`run_suite` result as JSON (what ``--report`` reads)."""
    with open(path, "w") as f:
        json.dump(result, f, indent=2, default=str)
