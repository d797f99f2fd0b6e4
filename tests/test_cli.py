"""``pygpukit info`` prints the device, or a clear error; ``pygpukit bench --report`` refuses
what it cannot render."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import CUDA

from pygpukit.runtime import Runtime


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


def test_bench_report_refuses_what_it_cannot_render(tmp_path: Path) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"results": {}}))
    cases = {
        ("-o", str(tmp_path / "page.md")): "add --report",
        ("--report", str(other), "--quick"): "renders an earlier run",
        ("--report", str(tmp_path / "missing.json")): "cannot read",
        ("--report", str(other)): "not what 'pygpukit bench --json' writes",
    }
    for args, message in cases.items():
        proc = _cli("bench", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("pygpukit: error: ") and message in proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "page.md").exists()


def test_info_says_whether_pytorch_is_charged_and_why_not(host_rt: Runtime) -> None:
    import importlib.util

    charged, why = host_rt.pytorch_charged()
    assert not charged
    if importlib.util.find_spec("torch") is None:
        assert why == "torch is not installed"
    else:
        assert why == "on the host backend PyTorch runs on the CPU"
