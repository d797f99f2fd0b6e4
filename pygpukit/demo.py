"""``pygpukit demo``: the assistant pipeline serving concurrent requests on three tiers.

Three assistant services share the device: ``interactive`` (Guaranteed contexts),
``standard`` (Burstable) and ``batch`` (BestEffort), each an LLM → TTS pipeline streamed
sentence by sentence (models with random weights). Batch requests are sent first, then the
others, all concurrently. At the end it prints a per-context table — VRAM used / peak /
budget, tasks, task latency p50 / p99, GPU time, time to first audio — and writes a
timeline of every GPU task (:meth:`Runtime.trace`: device times, a row per context) as
Chrome-trace JSON (open it in https://ui.perfetto.dev) and, where matplotlib is installed,
as a PNG.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._exceptions import _fmt_bytes
from .examples import Models, audio_seconds, build_assistant
from .pipeline import PipelineResult
from .runtime import QoSPolicy, Runtime, Task, Trace

__all__ = ("DemoReport", "run_demo")

SERVICES = (
    ("interactive", QoSPolicy.GUARANTEED),
    ("standard", QoSPolicy.BURSTABLE),
    ("batch", QoSPolicy.BEST_EFFORT),
)


@dataclass
class DemoReport:
    wall_s: float = 0.0
    warmup_s: float = 0.0  # one request per service first: kernel compilation on a first run
    trace: Trace | None = None  # every GPU task served (Runtime.trace)
    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    first_audio: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    audio_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    table: list[dict[str, Any]] = field(default_factory=list)


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


class _Progress:
    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def step(self) -> None:
        self.done += 1
        width = 30
        filled = width * self.done // self.total
        end = "\n" if self.done == self.total else ""
        print(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} requests",
            end=end,
            file=sys.stderr,
            flush=True,
        )


async def _serve(
    rt: Runtime, requests: dict[str, int], models: Models, tokens: int, torch: bool = False
) -> DemoReport:
    report = DemoReport()
    latency_by_ctx: dict[str, list[float]] = defaultdict(list)

    def on_task(task: Task) -> None:
        latency_by_ctx[task.context.name].append(task.t_done - task.t_queued)

    if torch:  # Hugging Face transformers models on PyTorch
        from .examples_hf import build_hf_assistant

        pipelines = {service: build_hf_assistant(rt, service, tier) for service, tier in SERVICES}
    else:
        pipelines = {
            service: build_assistant(rt, service, tier, models=models) for service, tier in SERVICES
        }
    report.warmup_s = await _warm_up(rt, pipelines)
    before = {ctx.name: ctx.usage() for ctx in rt.contexts}  # the table counts serving only
    rt.on_task_done(on_task)
    progress = _Progress(sum(requests.values()))

    async def one(service: str, i: int) -> None:
        start = time.perf_counter()
        result: PipelineResult = await pipelines[service].run(
            {"prompt": f"Request {i} for the {service} assistant.", "max_new_tokens": tokens},
            tier=dict(SERVICES)[service],
        )
        report.latency[service].append(time.perf_counter() - start)
        if result.first_output_s is not None:
            report.first_audio[service].append(result.first_output_s)
        report.audio_s[service] += audio_seconds(result)
        progress.step()

    start = time.perf_counter()
    order = [("batch", i) for i in range(requests["batch"])]
    order += [(s, i) for s in ("interactive", "standard") for i in range(requests[s])]
    with rt.trace() as report.trace:
        await asyncio.gather(*(one(s, i) for s, i in order))
    report.wall_s = time.perf_counter() - start

    for ctx in rt.contexts:
        u = ctx.usage()
        service = ctx.name.rsplit("-", 1)[0]
        lat = latency_by_ctx[ctx.name]
        report.table.append(
            {
                "context": ctx.name,
                "tier": ctx.qos.name,
                "used": u.used,
                "peak": u.peak,
                "budget": u.max,
                "tasks": u.tasks - before[ctx.name].tasks,
                "p50_ms": _pct(lat, 50) * 1e3,
                "p99_ms": _pct(lat, 99) * 1e3,
                "gpu_s": u.gpu_time_s - before[ctx.name].gpu_time_s,
                "first_audio_ms": _pct(report.first_audio[service], 50) * 1e3,
            }
        )
    return report


async def _warm_up(rt: Runtime, pipelines: dict[str, Any]) -> float:
    """One short request per service before the measured ones: on a first run on a GPU the
    models' kernels compile here (CuPy keeps them in its per-user cache for later runs)."""
    where = ""
    if rt.backend.name == "cuda":
        import cupy

        where = f"; CuPy caches them in {cupy.cuda.compiler.get_cache_dir()}"
    print(f"warming up (a first run on a GPU compiles its kernels{where}) ...", file=sys.stderr)
    start = time.perf_counter()
    for service, pipeline in pipelines.items():
        await pipeline.run({"prompt": f"Warm up {service}.", "max_new_tokens": 4})
    took = time.perf_counter() - start
    print(f"warm-up done in {took:.2f} s", file=sys.stderr)
    return took


def print_report(rt: Runtime, report: DemoReport) -> None:
    print(
        f"\npygpukit demo on {rt.device.name} ({rt.backend.name} backend), "
        f"{report.wall_s:.2f} s wall serving, after a {report.warmup_s:.2f} s warm-up"
    )
    head = (
        f"{'context':<18} {'tier':<12} {'used':>9} {'peak':>9} {'budget':>9} {'tasks':>6} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'GPU s':>7} {'1st audio ms':>13}"
    )
    print(head)
    print("-" * len(head))
    for r in report.table:
        print(
            f"{r['context']:<18} {r['tier']:<12} {_fmt_bytes(r['used']):>9} "
            f"{_fmt_bytes(r['peak']):>9} {_fmt_bytes(r['budget']):>9} {r['tasks']:>6} "
            f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['gpu_s']:>7.3f} "
            f"{r['first_audio_ms']:>13.1f}"
        )
    for service, lat in report.latency.items():
        print(
            f"{service:<12} requests {len(lat):>3}  latency p50 {_pct(lat, 50) * 1e3:7.1f} ms  "
            f"p99 {_pct(lat, 99) * 1e3:7.1f} ms  first audio p50 "
            f"{_pct(report.first_audio[service], 50) * 1e3:7.1f} ms  "
            f"audio {report.audio_s[service]:.1f} s"
        )


def write_png(report: DemoReport, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    spans = [] if report.trace is None else report.trace.spans
    rows = sorted({s[0] for s in spans})
    fig, ax = plt.subplots(figsize=(10, 0.5 + 0.45 * len(rows)))
    for y, ctx in enumerate(rows):
        bars = [(s[2], max(s[3] - s[2], 1e-4)) for s in spans if s[0] == ctx]
        ax.broken_barh(bars, (y - 0.4, 0.8))
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("seconds")
    ax.set_title("pygpukit demo: GPU tasks per context")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def run_demo(
    backend: str = "auto",
    *,
    requests: dict[str, int] | None = None,
    size: str = "auto",
    tokens: int = 48,
    trace: Path | None = Path("pygpukit-demo-trace.json"),
    png: Path | None = Path("pygpukit-demo-timeline.png"),
    torch: bool = False,
) -> DemoReport:
    """Run the demo and print its report; see the module docstring. ``torch``: the
    assistants on Hugging Face transformers models (GPT-2 → VITS) instead of CuPy ones."""
    requests = requests or {"interactive": 4, "standard": 4, "batch": 8}
    with Runtime(backend=backend) as rt:
        if size == "auto":
            size = "large" if rt.backend.name == "cuda" else "small"
        models = Models.large() if size == "large" else Models.small()
        report = asyncio.run(_serve(rt, requests, models, tokens, torch))
        print_report(rt, report)
        if trace is not None and report.trace is not None:
            trace.write_text(json.dumps(report.trace.chrome()))
            print(f"timeline: {trace} (open in https://ui.perfetto.dev)")
        if png is not None and write_png(report, png):
            print(f"timeline picture: {png}")
    return report
