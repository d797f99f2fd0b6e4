"""Kernels for the fixed-shape decode step: batch-1 matrix products without cuBLAS, and
fused LayerNorm and bias+GELU.

CuPy (14.2) refuses any cuBLAS call while a stream is being captured into a CUDA graph, and
one decode step of a batch-1 model is nothing but vector-matrix products. These two
kernels do them at memory bandwidth and capture fine; with NumPy (or any non-CuPy ``xp``)
the plain ``@`` is used.

- ``vecmat(xp, x, w)``: ``x`` ``(1, K)`` times ``w`` ``(K, N)``; split-K: each block sums
  ``ROWS`` rows for 128 adjacent outputs (coalesced reads of ``w``) and adds its partial
  sum into the zeroed result.
- ``vecmat_t(xp, x, e)``: ``x`` times ``e.T`` for ``e`` ``(N, K)`` (the tied output head);
  one warp per output, lanes striding along the row, then a shuffle reduction.
- ``layer_norm_row`` and ``bias_gelu``: one kernel each where the array-level code launches
  nine; fewer kernels make the captured graph shorter to launch and to run.
"""

from __future__ import annotations

import math
import threading
from typing import Any

__all__ = ("bias_gelu", "layer_norm_row", "vecmat", "vecmat_t")

ROWS = 64
THREADS = 128

_SOURCE = r"""
extern "C" __global__ void vecmat(const float* x, const float* w, float* y,
                                  int k_total, int n, int rows) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    int k0 = blockIdx.y * rows;
    int k1 = min(k_total, k0 + rows);
    float acc = 0.0f;
    for (int k = k0; k < k1; ++k) acc += x[k] * w[(size_t)k * n + j];
    atomicAdd(&y[j], acc);
}

extern "C" __global__ void vecmat_t(const float* x, const float* e, float* y,
                                    int k_total, int n) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= n) return;  /* whole warps leave together */
    const float* r = e + (size_t)row * k_total;
    float acc = 0.0f;
    for (int k = lane; k < k_total; k += 32) acc += x[k] * r[k];
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) y[row] = acc;
}

extern "C" __global__ void layer_norm_row(const float* x, const float* g, const float* b,
                                          float* y, int d, float eps) {
    __shared__ float part[2][32];
    float s = 0.0f, ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) { float v = x[i]; s += v; ss += v * v; }
    for (int off = 16; off > 0; off >>= 1) {
        s += __shfl_down_sync(0xffffffffu, s, off);
        ss += __shfl_down_sync(0xffffffffu, ss, off);
    }
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    if (lane == 0) { part[0][warp] = s; part[1][warp] = ss; }
    __syncthreads();
    if (warp == 0) {
        s = lane < warps ? part[0][lane] : 0.0f;
        ss = lane < warps ? part[1][lane] : 0.0f;
        for (int off = 16; off > 0; off >>= 1) {
            s += __shfl_down_sync(0xffffffffu, s, off);
            ss += __shfl_down_sync(0xffffffffu, ss, off);
        }
        if (lane == 0) { part[0][0] = s; part[1][0] = ss; }
    }
    __syncthreads();
    float mean = part[0][0] / d;
    float inv = rsqrtf(fmaxf(part[1][0] / d - mean * mean, 0.0f) + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) y[i] = (x[i] - mean) * inv * g[i] + b[i];
}
"""

_GELU_C = math.sqrt(2.0 / math.pi)

_modules: dict[int, Any] = {}
_lock = threading.Lock()


def _kernels(xp: Any) -> Any:
    key = id(xp)
    mod = _modules.get(key)
    if mod is None:
        with _lock:
            mod = _modules.get(key)
            if mod is None:
                mod = _modules[key] = xp.RawModule(code=_SOURCE)
    return mod


def _native(xp: Any, *arrays: Any) -> bool:
    return hasattr(xp, "RawModule") and all(
        a.dtype == xp.float32 and a.flags.c_contiguous for a in arrays
    )


def vecmat(xp: Any, x: Any, w: Any, bias: Any = None) -> Any:
    """``x @ w (+ bias)`` for one row ``x`` (``(1, K)``) and ``w`` ``(K, N)``."""
    if not _native(xp, x, w):
        return x @ w if bias is None else x @ w + bias
    k, n = w.shape
    if bias is None:
        y = xp.zeros((1, n), dtype=xp.float32)
    else:  # the partial sums are added onto the bias
        y = xp.array(bias.reshape(1, n), dtype=xp.float32)
    grid = ((n + THREADS - 1) // THREADS, (k + ROWS - 1) // ROWS)
    _kernels(xp).get_function("vecmat")(
        grid, (THREADS,), (x, w, y, xp.int32(k), xp.int32(n), xp.int32(ROWS))
    )
    return y


def vecmat_t(xp: Any, x: Any, e: Any) -> Any:
    """``x @ e.T`` for one row ``x`` (``(1, K)``) and ``e`` ``(N, K)``."""
    if not _native(xp, x, e):
        return x @ e.T
    n, k = e.shape
    y = xp.empty((1, n), dtype=xp.float32)
    warps_per_block = THREADS // 32
    grid = ((n + warps_per_block - 1) // warps_per_block,)
    _kernels(xp).get_function("vecmat_t")(grid, (THREADS,), (x, e, y, xp.int32(k), xp.int32(n)))
    return y


def layer_norm_row(xp: Any, x: Any, g: Any, b: Any, eps: float = 1e-5) -> Any:
    """LayerNorm of one row ``x`` (``(1, d)``): one block, one kernel."""
    if not _native(xp, x, g, b):
        from .layers import layer_norm

        return layer_norm(xp, x, g, b, eps)
    y = xp.empty_like(x)
    _kernels(xp).get_function("layer_norm_row")(
        (1,), (256,), (x, g, b, y, xp.int32(x.shape[-1]), xp.float32(eps))
    )
    return y


_bias_gelu: dict[int, Any] = {}


def bias_gelu(xp: Any, h: Any, b: Any) -> Any:
    """``gelu(h + b)`` (tanh approximation) in one elementwise kernel."""
    if not hasattr(xp, "ElementwiseKernel"):
        from .layers import gelu

        return gelu(xp, h + b)
    kernel = _bias_gelu.get(id(xp))
    if kernel is None:
        kernel = _bias_gelu[id(xp)] = xp.ElementwiseKernel(
            "float32 h, float32 b",
            "float32 y",
            f"float v = h + b; y = 0.5f * v * (1.0f + tanhf({_GELU_C!r}f * "
            "(v + 0.044715f * v * v * v)))",
            "pygpukit_bias_gelu",
        )
    return kernel(h, b)
