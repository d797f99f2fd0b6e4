"""The example pipelines run, and their weights round-trip through .npz files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pygpukit.examples import build_assistant, save_assistant_weights
from pygpukit.runtime import QoSPolicy, Runtime

pytestmark = pytest.mark.anyio
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "pipelines"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_saved_weights_load_back_to_the_same_assistant(tmp_path: Path) -> None:
    save_assistant_weights(tmp_path)
    request = {"prompt": "Same weights, same words.", "max_new_tokens": 40}
    outputs = []
    for weights in (None, tmp_path):
        with Runtime(backend="host") as rt:
            pipe = build_assistant(rt, f"a{len(outputs)}", QoSPolicy.GUARANTEED, weights=weights)
            result = await pipe.run(request)
            outputs.append([(a.text, float(a.samples.sum())) for a in result.output])
    assert outputs[0] == outputs[1]
    assert outputs[0]  # it said something


@pytest.mark.parametrize("script", ["assistant.py", "describe.py"])
def test_example_scripts_run(script: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--backend", "host"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ms" in proc.stdout
