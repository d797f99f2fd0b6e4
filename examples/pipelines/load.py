"""Load and chaos for the example server, on this machine only (127.0.0.1).

    python examples/pipelines/load.py                      # 3 rounds of 200, host backend
    python examples/pipelines/load.py --rounds 5 --requests 200 --json load.json --check

Starts ``server.py`` in a subprocess on a free loopback port, then per round sends
``--requests`` requests at once: the three assistant tiers, streamed and not (a share of the
streams dropped after their first line), ``/describe``, malformed bodies (bad JSON, wrong
types, a lone surrogate, too long, the wrong content type, an unknown service) and reads of
``/usage`` and ``/admission``. After each round it reads the server's memory (RSS), threads
and open files from ``/proc``, and whether every admission is idle again. It prints per-tier
latency (p50 / p99 of the answers that succeeded), the status codes per kind of request and
those figures per round; ``--check`` makes it exit 1 when a rule below is broken:

- no answer is a 500 and every error body is JSON ``{"error", "detail"}``;
- a malformed request is answered 4xx;
- the server is alive after each round, with nothing left running or waiting;
- threads and open files do not grow after the first round, nor RSS by more than 25%
  after the second (the first warms up: caches, the allocator's arenas).

Bounded: ``--requests`` per round (at most 1,000), ``--rounds`` (at most 20), and
``--max-seconds`` for the whole run. Needs httpx (in the ``test`` extra).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx

import pygpukit

SERVER = Path(__file__).with_name("server.py")
TIERS = ("interactive", "standard", "batch")
JSON = {"content-type": "application/json"}

#: how much the server's RSS may grow from the second round (the first warms up) on
RSS_GROWTH = 1.25
#: malformed requests: (name, path, body bytes, headers)
MALFORMED: tuple[tuple[str, str, bytes, dict[str, str]], ...] = (
    ("bad-json", "/assistant/interactive", b'{"prompt": ', JSON),
    ("wrong-type", "/assistant/standard", b'{"prompt": 3}', JSON),
    ("surrogate", "/describe", b'{"prompt": "\\ud800 hi"}', JSON),
    ("too-long", "/assistant/batch", json.dumps({"prompt": "x" * 5000}).encode(), JSON),
    ("no-tokens", "/assistant/batch", b'{"prompt": "hi", "max_new_tokens": 0}', JSON),
    ("not-json", "/assistant/interactive", b"prompt=hi", {"content-type": "text/plain"}),
    ("empty", "/describe", b"", JSON),
    ("unknown-service", "/assistant/premium", b'{"prompt": "hi"}', JSON),
)


@dataclass
class Answer:
    kind: str  # "assistant", "stream", "dropped", "describe", "malformed", "read"
    tier: str  # a tier, "describe", the malformed request's name, or the path read
    status: int  # 0: no answer (transport error or timeout)
    seconds: float
    error_shape: bool = True  # an error body was JSON {"error", "detail"}
    error: str | None = None  # the error's name: an error body's, or a stream's error line


@dataclass
class Round:
    index: int
    seconds: float
    answers: list[Answer] = field(default_factory=list)
    rss_mb: float | None = None
    threads: int | None = None
    open_files: int | None = None
    busy_admissions: dict[str, Any] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc(pid: int) -> tuple[float | None, int | None, int | None]:
    """RSS in MiB, threads and open files of ``pid`` (Linux ``/proc``; else ``None``)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        rss = int(fields["VmRSS"].split()[0]) / 1024
        threads = int(fields["Threads"])
        files = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, KeyError, ValueError):
        return None, None, None
    return rss, threads, files


async def _settled(pid: int) -> tuple[float | None, int | None, int | None]:
    """:func:`_proc`'s figures, the least of each over a second: connections the clients
    closed take a moment to close on the server's side too."""
    samples = []
    for _ in range(10):
        rss, threads, files = _proc(pid)
        if rss is None or threads is None or files is None:
            return None, None, None
        samples.append((rss, threads, files))
        await anyio.sleep(0.1)
    return (
        min(x[0] for x in samples),
        min(x[1] for x in samples),
        min(x[2] for x in samples),
    )


@contextlib.contextmanager
def serve(backend: str, timeout_s: float) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The example server in a subprocess on a free loopback port, until the block ends."""
    port = _free_port()
    cmd = [sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--backend", backend, "--timeout", str(timeout_s)]
    # the server imports the pygpukit this script imports (a checkout's, when run from one)
    here = str(Path(pygpukit.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        give_up = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{base}/usage", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > give_up:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise RuntimeError(f"the example server did not come up:\n{out}")
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _plan(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """``n`` (kind, tier) pairs in a fixed mix, shuffled."""
    plan: list[tuple[str, str]] = []
    for i in range(n):
        share = i / n
        if share < 0.45:
            plan.append(("assistant", TIERS[i % 3]))
        elif share < 0.55:
            plan.append(("stream", TIERS[i % 3]))
        elif share < 0.65:
            plan.append(("dropped", TIERS[i % 3]))
        elif share < 0.75:
            plan.append(("describe", "describe"))
        elif share < 0.92:
            plan.append(("malformed", MALFORMED[i % len(MALFORMED)][0]))
        else:
            plan.append(("read", "/usage" if i % 2 else "/admission"))
    rng.shuffle(plan)
    return plan


def _error_body(r: httpx.Response) -> tuple[bool, str | None]:
    """Whether an error answer's body is JSON ``{"error", "detail"}``, and its error."""
    if r.status_code < 400:
        return True, None
    try:
        body = r.json()
    except ValueError:
        return False, None
    ok = r.headers.get("content-type") == "application/json" and isinstance(body, dict)
    ok = ok and {"error", "detail"} <= set(body)
    return ok, str(body["error"]) if ok else None


async def _one(client: httpx.AsyncClient, kind: str, tier: str, i: int) -> Answer:
    body = {"prompt": f"Tell me about GPUs, request {i}.", "max_new_tokens": 24 + i % 24}
    error: str | None = None
    t0 = time.perf_counter()
    try:
        if kind == "assistant":
            r = await client.post(f"/assistant/{tier}", json=body)
        elif kind == "describe":
            r = await client.post("/describe", json=body)
        elif kind == "read":
            r = await client.get(tier)
        elif kind == "malformed":
            _, path, raw, headers = next(m for m in MALFORMED if m[0] == tier)
            r = await client.post(path, content=raw, headers=headers)
        else:  # a stream, read to the end or dropped after its first line
            async with client.stream("POST", f"/assistant/{tier}/stream", json=body) as r:
                if r.status_code >= 400:
                    await r.aread()
                else:
                    async for line in r.aiter_lines():
                        if line.startswith('{"error"'):  # the run failed mid-stream
                            error = json.loads(line)["error"]
                        if kind == "dropped" and line:
                            break
    except httpx.HTTPError:
        return Answer(kind, tier, 0, time.perf_counter() - t0, False)
    shape_ok, body_error = _error_body(r)
    took = time.perf_counter() - t0
    return Answer(kind, tier, r.status_code, took, shape_ok, error or body_error)


async def _round(base: str, index: int, n: int, timeout_s: float, seed: int) -> Round:
    plan = _plan(n, random.Random(seed + index))
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    result = Round(index, 0.0)
    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=timeout_s + 30) as client:

        async def one(i: int, kind: str, tier: str) -> None:
            result.answers.append(await _one(client, kind, tier, i))

        async with anyio.create_task_group() as tg:
            for i, (kind, tier) in enumerate(plan):
                tg.start_soon(one, i, kind, tier)
        result.seconds = time.perf_counter() - t0
        # every admission idle again: nothing left holding a slot after its client went
        with anyio.move_on_after(10):
            while True:
                state = (await client.get("/admission")).json()
                busy = {k: v for k, v in state.items() if v["running"] or v["waiting"]}
                if not busy:
                    break
                await anyio.sleep(0.1)
        result.busy_admissions = busy
    return result


def _pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[max(0, math.ceil(q * len(s)) - 1)]


def report(rounds: list[Round]) -> str:
    """The table printed after the run."""
    lines = []
    for r in rounds:
        ok: dict[str, list[float]] = defaultdict(list)
        codes: dict[str, Counter[str]] = defaultdict(Counter)
        for a in r.answers:
            codes[a.kind][f"{a.status or 'none'}{f' {a.error}' if a.error else ''}"] += 1
            if a.status == 200 and a.kind in ("assistant", "stream", "describe"):
                ok[a.tier].append(a.seconds * 1e3)
        rss = "-" if r.rss_mb is None else f"{r.rss_mb:.0f} MiB"
        lines.append(
            f"round {r.index}: {len(r.answers)} requests in {r.seconds:.1f} s; server RSS "
            f"{rss}, threads {r.threads}, open files {r.open_files}"
        )
        for tier in (*TIERS, "describe"):
            xs = ok.get(tier, [])
            if xs:
                lines.append(
                    f"  {tier:<12} ok {len(xs):4d}  p50 {_pct(xs, 0.5):8.1f} ms  "
                    f"p99 {_pct(xs, 0.99):8.1f} ms"
                )
        for kind in sorted(codes):
            counts = ", ".join(f"{k}: {v}" for k, v in sorted(codes[kind].items()))
            lines.append(f"  {kind:<12} {counts}")
    return "\n".join(lines)


def violations(rounds: list[Round], alive: bool) -> list[str]:
    """The rules of the module's docstring that the run broke."""
    out = []
    if not alive:
        out.append("the server died")
    for r in rounds:
        for a in r.answers:
            if a.status == 500 or a.status == 0:
                out.append(f"round {r.index}: {a.kind} {a.tier} answered {a.status or 'nothing'}")
            elif not a.error_shape:
                out.append(f"round {r.index}: {a.kind} {a.tier} {a.status}: not an error body")
            elif a.kind == "malformed" and not 400 <= a.status < 500:
                out.append(f"round {r.index}: malformed {a.tier} answered {a.status}")
        if r.busy_admissions:
            out.append(f"round {r.index}: admissions still busy: {r.busy_admissions}")
    measured = [r for r in rounds if r.threads is not None]
    if len(measured) > 1:
        first, warm = measured[0], measured[1]
        assert first.threads is not None
        assert first.open_files is not None
        assert warm.rss_mb is not None
        for r in measured[1:]:
            assert r.threads is not None
            assert r.open_files is not None
            assert r.rss_mb is not None
            if r.threads > first.threads:
                out.append(f"round {r.index}: threads grew {first.threads} -> {r.threads}")
            if r.open_files > first.open_files + 2:
                out.append(f"round {r.index}: open files {first.open_files} -> {r.open_files}")
            if r.rss_mb > RSS_GROWTH * warm.rss_mb:
                out.append(f"round {r.index}: RSS {warm.rss_mb:.0f} -> {r.rss_mb:.0f} MiB")
    return out


async def run(args: argparse.Namespace) -> tuple[list[Round], bool]:
    rounds: list[Round] = []
    with serve(args.backend, args.timeout) as (base, proc):
        with anyio.move_on_after(args.max_seconds):
            for index in range(args.rounds):
                r = await _round(base, index, args.requests, args.timeout, args.seed)
                r.rss_mb, r.threads, r.open_files = await _settled(proc.pid)
                rounds.append(r)
        alive = proc.poll() is None
    return rounds, alive


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, choices=range(1, 21), metavar="1..20")
    p.add_argument("--requests", type=int, default=200, choices=range(1, 1001), metavar="1..1000")
    p.add_argument("--backend", default="host", help="the server's backend (default host)")
    p.add_argument("--timeout", type=float, default=30.0, help="each request's deadline, s")
    p.add_argument("--max-seconds", type=float, default=600.0, help="for the whole run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="write every answer and figure there")
    p.add_argument("--check", action="store_true", help="exit 1 when a rule is broken")
    args = p.parse_args(argv)
    rounds, alive = anyio.run(run, args)
    print(report(rounds))
    broken = violations(rounds, alive)
    for line in broken:
        print(f"BROKEN: {line}")
    if args.json:
        data = {"rounds": [asdict(r) for r in rounds], "alive": alive, "broken": broken}
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 1 if broken and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
