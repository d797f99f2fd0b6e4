"""Soak: many submits across contexts created and destroyed; nothing may grow.

One runtime serves ``--contexts`` contexts in turn (1,000; ``--live`` of them at once, every
tier in rotation), ``--submits`` tasks in all (1,000,000), each allocating a small array
charged to its context. Around the submits: sessions held across awaits by concurrent tasks
(each checks that it still sees its own context), submits cancelled while queued or running
and submits whose deadline passed, and — on the side — a BestEffort context whose buffer a
Guaranteed context's reservation evicts, restored and checked bit for bit afterwards.

The work runs in ``--samples`` phases; after each, with every context of the phase
destroyed, the process's resident memory, threads and open file descriptors are read. The
first phases are warm-up; after them nothing may grow by more than 5%. Every destroyed
context must have given back every byte charged to it, without the garbage collector's help,
and be freed itself; at the end nothing is reserved, charged, queued, in flight or awaited.

glibc raises its threshold for serving large allocations with ``mmap`` each time such a
block is freed; freed blocks of tens of MB then stay in the heap of the thread that freed
them and count as resident, a cache that grows in steps up to a plateau, not a leak. The
soak pins the threshold where glibc is used, so that resident memory shows what the
program holds.

    pygpukit soak [--quick] [--backend host] [--json FILE]
    python -m pygpukit.benchmarks.soak [--quick] [...]

It prints a table and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import os
import platform
import resource
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from .._exceptions import DeadlineExceeded
from .._units import MB
from ..runtime import (
    Dispatcher,
    Evictable,
    ExecutionContext,
    QoSPolicy,
    Runtime,
    context_session,
    current_context,
)
from ._common import utc_day

__all__ = ("FULL", "GROWTH_LIMIT", "QUICK", "SoakConfig", "main", "run_soak")

GROWTH_LIMIT = 0.05  # RSS, threads and descriptors after warm-up, at most
TIERS = (QoSPolicy.GUARANTEED, QoSPolicy.BURSTABLE, QoSPolicy.BEST_EFFORT)


@dataclass(frozen=True)
class SoakConfig:
    """The size of a soak run.

    :ivar contexts: contexts created and destroyed in all
    :ivar submits: tasks submitted in all (spread evenly over the contexts)
    :ivar live: contexts alive at once (one worker each)
    :ivar batch: submits of one context awaited together
    :ivar samples: phases, each followed by a reading of memory, threads and descriptors
    :ivar warmup: phases before the baseline reading
    :ivar evictions: eviction rounds in all (spread over the phases)
    :ivar vram_mb: what the runtime manages: small, so that the eviction rounds must evict
    """

    contexts: int = 1000
    submits: int = 1_000_000
    live: int = 8
    batch: int = 64
    samples: int = 20
    warmup: int = 4
    evictions: int = 40
    vram_mb: int = 64


FULL = SoakConfig()
QUICK = SoakConfig(contexts=200, submits=50_000, samples=10, warmup=3, evictions=10)

CONTEXT_MB = 2  # each worker context's budget (its tier's reservation within it)
SESSION_BYTES = 64 << 10  # held across awaits in a session
WORK_ELEMS = 1024  # float32 per task
EVICT_MB = 24  # the eviction round's BestEffort buffer
# A Guaranteed reservation that fits only if that buffer goes: what the workers can hold at
# most (live * CONTEXT_MB) and it never fit in what the runtime manages together.
EVICT_RESERVE_MB = 44


@dataclass
class Tally:
    """What happened, counted as it happened."""

    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    expired: int = 0
    failed: int = 0  # submits that raised anything else (each an error below)
    errors: list[str] = field(default_factory=list)
    sessions: int = 0
    wrong_binding: int = 0
    contexts: int = 0
    charged_after_destroy: int = 0
    evictions: int = 0
    restores: int = 0
    corrupt_restores: int = 0

    error_count: int = 0

    def error(self, what: str, exc: BaseException) -> None:
        self.error_count += 1
        if len(self.errors) < 20:  # the first ones tell; a flood would only repeat them
            self.errors.append(f"{what}: {type(exc).__name__}: {exc}")


def _pin_mmap_threshold() -> bool:
    """Keep glibc's mmap threshold at its default (see the module docstring); whether it
    could (not on other C libraries)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3
    return bool(mallopt(m_mmap_threshold, 128 << 10))


def _rss_bytes() -> int:
    """Resident memory now (Linux); the peak where ``/proc`` is missing."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _fds() -> int:
    for where in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(where))
        except OSError:
            continue
    return -1


def _settle_threads(timeout: float = 2.0) -> int:
    """Threads once those of destroyed contexts have exited (they stop asynchronously)."""
    end = time.monotonic() + timeout
    count = threading.active_count()
    while time.monotonic() < end:
        time.sleep(0.02)
        now = threading.active_count()
        if now == count:
            break
        count = now
    return count


def _reading(phase: int, done: int, submits: int) -> dict[str, Any]:
    gc.collect()
    return {
        "phase": phase,
        "contexts": done,
        "submits": submits,
        "rss_bytes": _rss_bytes(),
        "threads": _settle_threads(),
        "fds": _fds(),
    }


def _read(handle: Evictable, where: Sequence[int]) -> list[float]:
    return [float(handle.array[i]) for i in where]


def _work(xp: Any, n: int) -> int:
    a = xp.ones((n,), dtype=xp.float32)  # charged to the task's context
    a += 1
    return n


class _Soak:
    def __init__(self, rt: Runtime, cfg: SoakConfig) -> None:
        self.rt = rt
        self.cfg = cfg
        self.tally = Tally()
        self.per_context = max(1, cfg.submits // cfg.contexts)
        self.names = itertools.count()
        self.gone: list[weakref.ref[ExecutionContext]] = []

    # -- one worker context -----------------------------------------------------------
    async def context_life(self, i: int) -> None:
        rt, cfg, tally = self.rt, self.cfg, self.tally
        tier = TIERS[i % len(TIERS)]
        base = CONTEXT_MB * MB // 2 if tier is QoSPolicy.BURSTABLE else None
        ctx = rt.create_context(
            f"soak-{next(self.names)}", max_vram=CONTEXT_MB * MB, base_vram=base, qos=tier
        )
        tally.contexts += 1
        try:
            if tier is not QoSPolicy.GUARANTEED:  # a buffer the runtime may spill
                with context_session(ctx):
                    weights = rt.xp.ones((SESSION_BYTES // 4,), dtype=rt.xp.float32)
                handle = ctx.evictable(weights)
                del weights
            else:
                handle = None
            left = self.per_context
            round_no = 0
            while left > 0:
                n = min(cfg.batch, left)
                left -= n
                if round_no % 2:
                    await self.session_batch(ctx, n)
                else:
                    await self.batch(ctx, n)
                round_no += 1
            if handle is not None:
                handle.release()
                del handle
        finally:
            rt.destroy_context(ctx)
            if ctx.usage().used:  # its tasks' arrays and its buffers: all freed by now
                tally.charged_after_destroy += 1
            self.gone.append(weakref.ref(ctx))

    async def batch(self, ctx: ExecutionContext, n: int) -> None:
        """``n`` submits at once: most awaited, every 8th cancelled at once, every 8th
        (offset) with a deadline already past (it runs only if it launches at once)."""
        async with anyio.create_task_group() as tg:
            for k in range(n):
                tg.start_soon(self.one, ctx, k)

    async def session_batch(self, ctx: ExecutionContext, n: int) -> None:
        """A batch from inside sessions held across awaits by two concurrent tasks, each
        with an array allocated in its session."""
        half = n // 2

        async def holder(count: int) -> None:
            async with context_session(ctx):
                self.tally.sessions += 1
                held = self.rt.xp.zeros((SESSION_BYTES // 4,), dtype=self.rt.xp.float32)
                try:
                    async with anyio.create_task_group() as tg:
                        for k in range(count):
                            tg.start_soon(self.one, ctx, k)
                    await anyio.lowlevel.checkpoint()  # others' sessions step in between
                    if current_context() is not ctx:
                        self.tally.wrong_binding += 1
                finally:
                    del held
            if current_context() is not None:
                self.tally.wrong_binding += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(holder, half)
            tg.start_soon(holder, n - half)

    async def one(self, ctx: ExecutionContext, k: int) -> None:
        tally = self.tally
        tally.submitted += 1
        xp = self.rt.xp
        try:
            if k % 8 == 3:
                with anyio.move_on_after(0):  # cancelled at its first await
                    await ctx.submit(_work, xp, WORK_ELEMS)
                    tally.completed += 1
                    return
                tally.cancelled += 1
            elif k % 8 == 5:
                await ctx.submit(_work, xp, WORK_ELEMS, deadline=time.monotonic() - 1.0)
                tally.completed += 1
            else:
                await ctx.submit(_work, xp, WORK_ELEMS, priority=k % 3)
                tally.completed += 1
        except DeadlineExceeded:
            tally.expired += 1
        except Exception as exc:
            tally.failed += 1
            tally.error(f"submit to {ctx.name}", exc)

    async def worker(self, lives: list[int]) -> None:
        for i in lives:
            try:
                await self.context_life(i)
            except Exception as exc:
                self.tally.error(f"context {i}", exc)

    # -- an eviction round ------------------------------------------------------------
    async def eviction_round(self) -> None:
        """A BestEffort buffer that a Guaranteed reservation must evict, then restored by
        the BestEffort context's next task and checked."""
        rt, tally = self.rt, self.tally
        n = EVICT_MB * MB // 4
        be = rt.create_context(
            f"soak-evict-be-{next(self.names)}",
            max_vram=(EVICT_MB + 2) * MB,
            qos=QoSPolicy.BEST_EFFORT,
        )
        try:
            with context_session(be):
                arr = rt.xp.arange(n, dtype=rt.xp.float32)
            handle = be.evictable(arr)
            del arr
            g = rt.create_context(
                f"soak-evict-g-{next(self.names)}",
                max_vram=EVICT_RESERVE_MB * MB,
                qos=QoSPolicy.GUARANTEED,
            )
            try:
                tally.evictions += handle.evictions
                await g.submit(_work, rt.xp, WORK_ELEMS)
            finally:
                rt.destroy_context(g)
            probes = (0, 1, n // 2, n - 1)  # float32 holds these integers exactly
            values = await be.submit(_read, handle, probes)
            tally.restores += handle.restores
            if values != [float(p) for p in probes]:
                tally.corrupt_restores += 1
            handle.release()
            del handle
        finally:
            rt.destroy_context(be)
            if be.usage().used:
                tally.charged_after_destroy += 1
            self.gone.append(weakref.ref(be))

    # -- the whole run ------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        readings = [_reading(0, 0, 0)]
        phases = _split(range(cfg.contexts), cfg.samples)
        rounds = _split(range(cfg.evictions), cfg.samples)
        started = time.perf_counter()
        for phase, (lives, evictions) in enumerate(zip(phases, rounds, strict=True), 1):
            per_worker = _split(lives, cfg.live)
            async with anyio.create_task_group() as tg:
                for chunk in per_worker:
                    tg.start_soon(self.worker, chunk)

                async def evicting(count: int = len(evictions)) -> None:
                    for _ in range(count):
                        try:
                            await self.eviction_round()
                        except Exception as exc:
                            self.tally.error("eviction round", exc)

                tg.start_soon(evicting)
            readings.append(_reading(phase, self.tally.contexts, self.tally.submitted))
        return {"readings": readings, "seconds": time.perf_counter() - started}


def _split(items: Sequence[int], parts: int) -> list[list[int]]:
    """``items`` in ``parts`` consecutive runs of nearly equal length."""
    n = len(items)
    return [list(items[n * p // parts : n * (p + 1) // parts]) for p in range(parts)]


def _growth(readings: list[dict[str, Any]], key: str, warmup: int) -> dict[str, Any]:
    base = readings[warmup][key]
    after = [r[key] for r in readings[warmup:]]
    end = after[-1]
    growth = (end - base) / base if base > 0 else 0.0
    return {
        "warm": base,
        "end": end,
        "max": max(after),
        "growth": growth,
        "ok": base >= 0 and growth <= GROWTH_LIMIT,
    }


def _final_state(rt: Runtime, soak: _Soak) -> dict[str, Any]:
    gc.collect()
    policy = rt.policy
    queued = len(policy.queued())
    in_flight = tracked = 0
    if isinstance(policy, Dispatcher):  # its counters keep no destroyed context
        in_flight = sum(policy.in_flight_ctx.values())
        tracked = len(policy.in_flight_ctx) + len(policy.queued_ctx)
    return {
        "live_contexts": len(rt.contexts),
        "reserved_bytes": rt.ledger.reserved_total(),
        "unreturned_bytes": rt.ledger.capacity - rt.available_vram(),
        "queued": queued,
        "in_flight": in_flight,
        "dispatcher_entries": tracked,
        "awaiting": rt.bridge.stats().pending,
        "contexts_not_freed": sum(ref() is not None for ref in soak.gone),
    }


async def _soak(backend: str, cfg: SoakConfig) -> dict[str, Any]:
    pinned = _pin_mmap_threshold()
    with Runtime(backend=backend, vram_limit=cfg.vram_mb * MB) as rt:
        soak = _Soak(rt, cfg)
        run = await soak.run()
        final = _final_state(rt, soak)
        device = rt.device.name
        backend_name = rt.backend.name
    t = soak.tally
    readings = run["readings"]
    warm = min(cfg.warmup, len(readings) - 1)
    growth = {key: _growth(readings, key, warm) for key in ("rss_bytes", "threads", "fds")}
    accounted = t.completed + t.cancelled + t.expired + t.failed
    checks = {
        "rss flat": growth["rss_bytes"]["ok"],
        "threads flat": growth["threads"]["ok"],
        "descriptors flat": growth["fds"]["ok"],
        "no errors": t.error_count == 0,
        "every submit accounted for": t.submitted == accounted,
        "sessions bound right": t.wrong_binding == 0,
        "charges back to zero at destroy": t.charged_after_destroy == 0,
        "evictions happened and restored intact": (
            t.evictions >= cfg.evictions and t.restores >= cfg.evictions and not t.corrupt_restores
        ),
        "nothing left at the end": not any(
            final[k]
            for k in (
                "live_contexts",
                "reserved_bytes",
                "unreturned_bytes",
                "queued",
                "in_flight",
                "dispatcher_entries",
                "awaiting",
            )
        ),
        "destroyed contexts freed": final["contexts_not_freed"] == 0,
    }
    return {
        "backend": backend_name,
        "device": device,
        "config": cfg.__dict__,
        "seconds": run["seconds"],
        "mmap_threshold_pinned": pinned,
        "tally": {k: v for k, v in t.__dict__.items() if k != "errors"},
        "errors": t.errors,
        "readings": readings,
        "growth": growth,
        "final": final,
        "checks": checks,
        "ok": all(checks.values()),
        "python": platform.python_version(),
        "date": utc_day(),
    }


def run_soak(backend: str = "auto", cfg: SoakConfig = FULL) -> dict[str, Any]:
    """Run a soak and print its table.

    :param backend: ``auto``, ``cuda`` or ``host``
    :param cfg: the run's size (:data:`FULL`, :data:`QUICK`, or your own)
    :return: the run: its ``config``, what it counted (``tally``), the ``readings`` after
        each phase, the ``growth`` after warm-up, the ``final`` state, each check and
        whether all passed (``ok``)
    """
    result: dict[str, Any] = anyio.run(_soak, backend, cfg)
    print_table(result)
    return result


def _mib(n: int) -> str:
    return f"{n / MB:.1f} MiB"


def print_table(r: dict[str, Any]) -> None:
    t, g = r["tally"], r["growth"]
    print(
        f"\nsoak on {r['backend']} ({r['device']}): {t['contexts']} contexts, "
        f"{t['submitted']} submits in {r['seconds']:.1f} s "
        f"({t['submitted'] / max(r['seconds'], 1e-9):,.0f}/s)"
    )
    print(
        f"completed {t['completed']}, cancelled {t['cancelled']}, deadline passed "
        f"{t['expired']}, sessions {t['sessions']}, evictions {t['evictions']}, "
        f"restores {t['restores']}"
    )
    print("\n| after warm-up | warm | end | max | growth | limit | ok |")
    print("|---|---|---|---|---|---|---|")
    for key, label, fmt in (
        ("rss_bytes", "resident memory", _mib),
        ("threads", "threads", str),
        ("fds", "file descriptors", str),
    ):
        row = g[key]
        print(
            f"| {label} | {fmt(row['warm'])} | {fmt(row['end'])} | {fmt(row['max'])} | "
            f"{row['growth']:+.1%} | {GROWTH_LIMIT:.0%} | {'yes' if row['ok'] else '**no**'} |"
        )
    print("\n| check | ok |")
    print("|---|---|")
    for name, ok in r["checks"].items():
        print(f"| {name} | {'yes' if ok else '**no**'} |")
    if r["errors"]:
        print("\nfirst errors:")
        for e in r["errors"]:
            print(f"  {e}")
    print(f"\nsoak: {'passed' if r['ok'] else 'FAILED'}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The soak's options (shared by ``pygpukit soak`` and ``python -m``)."""
    p.add_argument("--backend", choices=("auto", "cuda", "host"), help="default: auto")
    p.add_argument("--quick", action="store_true", help="a small run (the CI variant)")
    p.add_argument("--contexts", type=int, help="contexts created and destroyed in all")
    p.add_argument("--submits", type=int, help="tasks submitted in all")
    p.add_argument("--json", help="write the results here")


def from_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Run the soak ``args`` describe (see :func:`add_arguments`); write ``--json``."""
    import dataclasses
    import json

    from .._exceptions import InvalidArgument

    cfg = QUICK if args.quick else FULL
    for name in ("contexts", "submits"):
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise InvalidArgument(f"--{name} must be at least 1, not {value}")
            cfg = dataclasses.replace(cfg, **{name: value})
    if cfg.contexts < cfg.samples:
        cfg = dataclasses.replace(cfg, samples=cfg.contexts, warmup=min(cfg.warmup, 1))
    result = run_soak(args.backend or "auto", cfg)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(
        prog="python -m pygpukit.benchmarks.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return from_arguments(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
