"""On a real GPU: an await pending on a stream whose context faults raises CudaError fast.

The fault kills the CUDA context for the whole process, so it runs in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from conftest import CUDA

SCRIPT = textwrap.dedent(
    r"""
    import asyncio, sys, time
    import cupy
    from pygpukit import CudaError
    from pygpukit.runtime import Runtime

    SPIN = cupy.RawKernel(r'''
    extern "C" __global__ void spin(long long cycles) {
        long long start = clock64();
        while (clock64() - start < cycles) { }
    }''', "spin")
    OOB = cupy.RawKernel(r'''
    extern "C" __global__ void oob(float* p) { p[threadIdx.x + (1ull << 40)] = 1.0f; }
    ''', "oob")

    async def main():
        rt = Runtime(backend="cuda")
        stream = rt.create_stream()
        buf = cupy.zeros(32, dtype=cupy.float32)
        with stream.raw.cp:
            SPIN((1,), (1,), (cupy.int64(400_000_000),))   # ~0.2 s: the await is armed first
            OOB((1,), (32,), (buf,))
        start = time.perf_counter()
        try:
            await asyncio.wait_for(stream, timeout=10)
        except CudaError as exc:
            print(f"FAULT-REPORTED {time.perf_counter() - start:.3f} {exc.status}")
            return 0
        print("NO-ERROR")
        return 1

    sys.exit(asyncio.run(main()))
    """
)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_await_on_faulted_context_raises_cuda_error_within_a_second() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    line = next(x for x in proc.stdout.splitlines() if x.startswith("FAULT-REPORTED"))
    elapsed = float(line.split()[1])
    print(line)
    assert elapsed < 1.0 + 0.25, out  # the spin kernel runs ~0.2 s before the fault
