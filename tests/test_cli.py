"""``pygpukit info`` prints the device, or a clear error."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import CUDA


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pygpukit.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_info_prints_the_device() -> None:
    proc = _cli("info", "--backend", "host")
    assert proc.returncode == 0, proc.stderr
    assert "host executor" in proc.stdout
    assert "0 (least) .. -5 (greatest)" in proc.stdout


def test_info_json() -> None:
    proc = _cli("info", "--backend", "host", "--json")
    data = json.loads(proc.stdout)
    assert data["backend"] == "host" and data["priority_range"] == [0, -5]


def test_info_on_cuda_without_gpu_is_a_clear_error() -> None:
    proc = _cli("info", "--backend", "cuda")
    if CUDA:
        assert proc.returncode == 0 and "cuda" in proc.stdout
    else:
        assert proc.returncode == 2
        assert proc.stderr.startswith("pygpukit: error: ")
        assert "Traceback" not in proc.stderr
