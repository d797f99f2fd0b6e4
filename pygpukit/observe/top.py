"""``pygpukit top URL``: a live terminal view of a running server, from its ``/metrics``.

Per context: memory held against its budget (a bar), tasks queued and in flight, tasks
finished per second, their GPU time p50 / p99 and queue wait p99, and the context's share
of the GPU time used. Rates, percentiles and shares are over the last refresh interval
(the first frame: since the server started), estimated from the histograms' buckets as
Prometheus's ``histogram_quantile`` does.

Plain ANSI output redrawn every interval and one key read without echo: it works over SSH
and in any terminal that scrolls. ``q`` (or Ctrl-C) quits; ``--once`` prints one frame and
exits (for scripts, and terminals that are not terminals). Needs the ``metrics`` extra
(prometheus-client's parser).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from .._exceptions import _fmt_bytes
from .._stats import quantile

__all__ = ("Snapshot", "frame", "run_top", "scrape")

_CLEAR = "\x1b[H\x1b[2J"
_ALT_ON, _ALT_OFF = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
BAR = 12  # characters of the memory bar


@dataclass
class Context:
    """What one scrape says of one context."""

    name: str
    tier: str = ""
    held: float = 0.0
    budget: float = 0.0
    queued: float = 0.0
    in_flight: float = 0.0
    tasks: float = 0.0  # finished (ok + failed)
    gpu_s: float = 0.0  # GPU seconds, in all
    gpu: dict[float, float] = field(default_factory=dict)  # le -> cumulative count
    wait: dict[float, float] = field(default_factory=dict)


@dataclass
class Snapshot:
    """One scrape of a server's metrics."""

    at: float
    contexts: dict[str, Context]
    device: str = ""
    managed: float = 0.0
    available: float = 0.0
    completions: float = 0.0
    faults: float = 0.0


# metric -> the field of Context (or Snapshot) its value goes to
_CONTEXT_VALUES = {
    "pygpukit_context_memory_held_bytes": "held",
    "pygpukit_context_memory_budget_bytes": "budget",
    "pygpukit_tasks_queued": "queued",
    "pygpukit_tasks_in_flight": "in_flight",
    "pygpukit_task_gpu_seconds_sum": "gpu_s",
}
_CONTEXT_BUCKETS = {
    "pygpukit_task_gpu_seconds_bucket": "gpu",
    "pygpukit_task_queue_wait_seconds_bucket": "wait",
}
_DEVICE_VALUES = {
    "pygpukit_device_memory_managed_bytes": "managed",
    "pygpukit_device_memory_available_bytes": "available",
    "pygpukit_completions_total": "completions",
    "pygpukit_device_faults_total": "faults",
}


def scrape(url: str, timeout: float = 2.0) -> Snapshot:
    """Fetch and read ``url`` (a Prometheus text endpoint of pygpukit)."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError as exc:
        raise ImportError(
            "pygpukit top needs prometheus-client's parser; install it with "
            "pip install 'pygpukit-async[metrics]'"
        ) from exc
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    snap = Snapshot(time.monotonic(), {})
    contexts: defaultdict[str, Context] = defaultdict(lambda: Context(""))
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if "context" in labels:
                ctx = contexts[labels["context"]]
                ctx.name, ctx.tier = labels["context"], labels.get("tier", "")
                if name in _CONTEXT_VALUES:
                    setattr(ctx, _CONTEXT_VALUES[name], value)
                elif name in _CONTEXT_BUCKETS:
                    getattr(ctx, _CONTEXT_BUCKETS[name])[float(labels["le"])] = value
                elif name == "pygpukit_tasks_total" and labels["outcome"] in ("ok", "failed"):
                    ctx.tasks += value
            elif name in _DEVICE_VALUES:
                setattr(snap, _DEVICE_VALUES[name], value)
            elif name == "pygpukit_device_info":
                snap.device = f"{labels['name']} ({labels['backend']}, device {labels['device']})"
    snap.contexts = dict(contexts)
    return snap


def _delta(now: dict[float, float], then: dict[float, float] | None) -> list[tuple[float, float]]:
    then = then or {}
    return sorted((le, n - then.get(le, 0.0)) for le, n in now.items())


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def frame(url: str, now: Snapshot, before: Snapshot | None, width: int = 120) -> str:
    """The text of one frame: ``now`` against ``before`` (``None``: since the start)."""
    span = None if before is None else max(now.at - before.at, 1e-9)
    lines = [f"pygpukit top  {url}  {now.device}  {time.strftime('%H:%M:%S')}"]
    rate = ""
    if before is not None and span is not None:
        rate = f"  completions {(now.completions - before.completions) / span:,.0f}/s"
    fault = "  DEVICE FAULTED: restart the process" if now.faults else ""
    lines.append(
        f"memory managed {_fmt_bytes(int(now.managed))}, available "
        f"{_fmt_bytes(int(now.available))}{rate}{fault}"
    )
    head = (
        f"{'CONTEXT':<18} {'TIER':<11} {'MEMORY held/budget':<{BAR + 20}} {'QUEUE':>5} "
        f"{'RUN':>4} {'TASK/S':>7} {'GPU p50':>7} {'p99 ms':>7} {'WAIT99':>7} {'SHARE':>5}"
    )
    lines += ["", head]
    used = {
        name: c.gpu_s - (before.contexts[name].gpu_s if before and name in before.contexts else 0.0)
        for name, c in now.contexts.items()
    }
    total = sum(used.values())
    for name, c in sorted(now.contexts.items(), key=lambda kv: (_tier_rank(kv[1].tier), kv[0])):
        was = before.contexts.get(name) if before else None
        gpu = _delta(c.gpu, was.gpu if was else None)
        wait = _delta(c.wait, was.wait if was else None)
        finished = c.tasks - (was.tasks if was else 0.0)
        share = used[name] / total if total > 0 else 0.0
        filled = 0 if c.budget <= 0 else min(BAR, round(BAR * c.held / c.budget))
        amounts = f"{_fmt_bytes(int(c.held))}/{_fmt_bytes(int(c.budget))}"
        bar = f"[{'#' * filled}{'.' * (BAR - filled)}] {amounts}"
        per_s = "-" if span is None else f"{finished / span:.1f}"
        lines.append(
            f"{name[:18]:<18} {c.tier[:11]:<11} {bar:<{BAR + 20}} {c.queued:>5.0f} "
            f"{c.in_flight:>4.0f} {per_s:>7} {_ms(quantile(gpu, 0.5)):>7} "
            f"{_ms(quantile(gpu, 0.99)):>7} {_ms(quantile(wait, 0.99)):>7} {share:>5.0%}"
        )
    if not now.contexts:
        lines.append("(no contexts)")
    lines += ["", "GPU p50 / p99 ms: GPU time per task; WAIT99: queue wait p99 (ms); q quits"]
    return "\n".join(line[:width] for line in lines)


def _tier_rank(tier: str) -> int:
    return {"GUARANTEED": 0, "BURSTABLE": 1, "BEST_EFFORT": 2}.get(tier, 3)


@contextlib.contextmanager
def _keys(stream: IO[str]) -> Iterator[int | None]:
    """Reads keys one at a time without echo, where ``stream`` is a terminal."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        yield None
        return
    if not os.isatty(fd):
        yield fd
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run_top(
    url: str,
    *,
    interval: float = 1.0,
    once: bool = False,
    stdin: IO[str] | None = None,
    stdout: IO[str] | None = None,
) -> int:
    """Show ``url``'s contexts, refreshed every ``interval`` seconds, until ``q``."""
    out = stdout or sys.stdout
    if once:
        width = shutil.get_terminal_size((120, 40)).columns
        print(frame(url, scrape(url), None, width), file=out)
        return 0
    before: Snapshot | None = None
    out.write(_ALT_ON)
    try:
        with _keys(stdin or sys.stdin) as fd:
            while True:
                width = shutil.get_terminal_size((120, 40)).columns
                try:
                    now = scrape(url)
                    text = frame(url, now, before, width)
                    before = now
                except OSError as exc:  # the server went away: say so, keep trying
                    text = f"pygpukit top  {url}\n\ncannot read the metrics: {exc}\n\nq quits"
                out.write(_CLEAR + text)
                out.flush()
                if _quit_within(fd, interval):
                    return 0
    except KeyboardInterrupt:
        return 0
    finally:
        out.write(_ALT_OFF)
        out.flush()


def _quit_within(fd: int | None, seconds: float) -> bool:
    """Wait up to ``seconds`` for a key; whether it asked to quit (``q``, or input ended)."""
    if fd is None:
        time.sleep(seconds)
        return False
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            key = os.read(fd, 1)
            if key in (b"q", b"Q", b""):
                return True
    return False
