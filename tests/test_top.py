"""``pygpukit top``: its frames from two scrapes, and the live view in a pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")

from pygpukit.observe.metrics import start_metrics_server
from pygpukit.observe.top import Context, Snapshot, frame, scrape
from pygpukit.runtime import QoSPolicy, Runtime

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


@pytest.fixture
def served() -> Iterator[tuple[str, Runtime]]:
    """A runtime with two contexts that ran tasks, its metrics on a loopback port."""
    import anyio

    rt = Runtime(backend="host")
    guaranteed = rt.create_context("top-interactive", 64 * MiB, qos=QoSPolicy.GUARANTEED)
    batch = rt.create_context("top-batch", 32 * MiB, qos=QoSPolicy.BEST_EFFORT)

    async def work() -> None:
        async with anyio.create_task_group() as tg:
            for ctx in (guaranteed, batch):
                for _ in range(10):
                    tg.start_soon(ctx.submit, sum, range(10_000))

    anyio.run(work)
    server = start_metrics_server(0, rt)
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics", rt
    finally:
        server.shutdown()
        server.server_close()
        rt.close()


def test_a_frame_shows_each_context_from_the_interval_between_scrapes() -> None:
    def ctx(name: str, tasks: float, gpu_s: float, gpu: dict[float, float]) -> Context:
        return Context(name, "GUARANTEED", 32 * MiB, 128 * MiB, 2, 1, tasks, gpu_s, gpu, {})

    inf = float("inf")
    before = Snapshot(10.0, {"a": ctx("a", 100, 1.0, {0.001: 100, 0.01: 100, inf: 100})})
    # in the 2 s between: 10 tasks, all between 1 and 10 ms (the earlier 100 were faster)
    now = Snapshot(12.0, {"a": ctx("a", 110, 1.05, {0.001: 100, 0.01: 110, inf: 110})})
    now.contexts["b"] = Context("b", "BEST_EFFORT", 0, MiB, 0, 0, 5, 0.15, {inf: 5}, {})
    text = frame("http://x/metrics", now, before, width=200)
    row = next(line for line in text.splitlines() if line.startswith("a "))
    cells = row.split()
    assert "[###.........]" in row and "32 MiB/128 MiB" in row  # a quarter of the budget
    # queued, running, tasks/s, GPU p50 and p99 ms, wait p99 (no waits recorded)
    assert cells[-7:-1] == ["2", "1", "5.0", "5.50", "9.91", "-"]
    assert cells[-1] == "25%"  # 0.05 of the 0.20 GPU seconds used in the interval
    lines = text.splitlines()
    assert lines.index(row) < next(i for i, line in enumerate(lines) if line.startswith("b "))
    assert all(len(line) <= 60 for line in frame("u", now, before, width=60).splitlines())


def test_once_prints_one_frame_of_the_servers_contexts(served: tuple[str, Runtime]) -> None:
    url, rt = served
    snap = scrape(url)
    assert set(snap.contexts) == {"top-interactive", "top-batch"}
    assert snap.contexts["top-batch"].tasks == 10
    assert snap.contexts["top-interactive"].budget == 64 * MiB
    assert snap.managed == rt.ledger.capacity
    proc = subprocess.run(
        [sys.executable, "-m", "pygpukit.cli", "top", url.removesuffix("/metrics"), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines()[4:] if line.strip()]
    assert rows[:2] == ["top-interactive", "top-batch"]  # Guaranteed first


def test_once_against_no_server_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pygpukit.cli", "top", "127.0.0.1:9", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "pygpukit: error: cannot read http://127.0.0.1:9/metrics" in proc.stderr


def _read_until(fd: int, wanted: list[bytes], timeout: float) -> bytes:
    seen = b""
    end = time.monotonic() + timeout
    while not all(w in seen for w in wanted):
        left = end - time.monotonic()
        assert left > 0, f"the view never showed {wanted}; it showed {seen[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the child closed the terminal
                break
            seen += chunk
    return seen


def test_the_live_view_renders_in_a_terminal_and_quits_on_q(served: tuple[str, Runtime]) -> None:
    url, _rt = served
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pygpukit.cli", "top", url, "--interval", "0.2"],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=ROOT,
        env={**os.environ, "TERM": "xterm"},
        close_fds=True,
    )
    os.close(slave)
    try:
        # two frames: the second has rates over the interval
        shown = _read_until(master, [b"top-interactive", b"top-batch", b"q quits"], 30)
        shown += _read_until(master, [b"\x1b[H\x1b[2J"], 10)
        assert b"\x1b[?1049h" in shown  # the alternate screen, left on exit
        assert b"GUARANTEED" in shown and b"BEST_EFFORT" in shown
        os.write(master, b"q")
        assert proc.wait(timeout=10) == 0
        rest = b""
        try:
            while select.select([master], [], [], 0.5)[0]:
                chunk = os.read(master, 65536)
                if not chunk:
                    break
                rest += chunk
        except OSError:
            pass
        assert b"\x1b[?1049l" in shown + rest  # the screen given back
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
