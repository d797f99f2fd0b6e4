"""The README's first example runs and does what its comments say (CUDA and PyTorch)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CUDA

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_the_first_example_charges_the_model_to_its_context() -> None:
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None
    checks = (
        "\nassert llm.usage().held >= 4096 * 4096 * 2, llm.usage()  # the weights\n"
        "assert tts.usage().held == 0\n"
        "assert llm.usage().reserved == 4 * GB\n"
        "print('checked')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code.group(1) + checks],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines[-1] == "checked"
    assert float(lines[-2]) != 0.0  # the model ran: a real number came back
