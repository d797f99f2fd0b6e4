"""Kernels for the fixed-shape decode step: batch-1 matrix products without cuBLAS, fused
LayerNorm, bias+GELU, embedding, attention over the cache, and sampling.

CuPy (14.2) refuses any cuBLAS call while a stream is being captured into a CUDA graph, and
one decode step of a batch-1 model is nothing but vector-matrix products. These kernels do
them at memory bandwidth and capture fine; with NumPy (or any non-CuPy ``xp``) each
function does the same computation with array operations.

- ``vecmat(xp, x, w, bias, residual)``: ``residual + x @ w + bias`` for ``x`` ``(1, K)``,
  ``w`` ``(K, N)``; split-K: each block sums ``ROWS`` rows for 128 adjacent outputs
  (coalesced reads of ``w``) and adds its partial sum into the result, which starts as
  ``residual + bias`` (one kernel) or zeros.
- ``vecmat_t(xp, x, e)``: ``x`` times ``e.T`` for ``e`` ``(N, K)`` (the tied output head);
  one warp per output, lanes striding along the row, then a shuffle reduction.
- ``layer_norm_row``, ``bias_gelu``, ``embed_row``: one kernel each where the array-level
  code launches three to nine.
- ``attend_row``: one token's attention, one block per head: writes the token's key and
  value into the cache row ``pos`` (read from the device), scores the rows up to ``pos``,
  softmax, weighted sum of the values. The array-level version launches about twelve
  kernels per layer.
- ``sample_row``: the next token, on the device: the prompt's next token while the prompt
  lasts, else one picked from the logits with the host's float64 arithmetic (Gumbel-max
  over noise drawn on the host) and written to a host-visible array; it goes to the next
  step's input and the position advances — a step needs nothing from the host.

Fewer kernels make a captured graph shorter to run, and a graph that samples on its own
lets the host queue steps ahead instead of waiting for each token.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

from ._ops import gelu, layer_norm, softmax

__all__ = (
    "attend_row",
    "bias_gelu",
    "embed_row",
    "layer_norm_row",
    "sample_row",
    "vecmat",
    "vecmat_t",
)

ROWS = 64
THREADS = 128

_SOURCE = r"""
#define NEG_INF_F __int_as_float(0xff800000)
#define NEG_INF_D __longlong_as_double((long long)0xfff0000000000000ULL)
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
__device__ float block_sum(float v, float* red) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();  /* red may still be read from the last call */
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = threadIdx.x < warps ? red[threadIdx.x] : 0.0f;
    if (warp == 0)
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    if (threadIdx.x == 0) red[0] = v;
    __syncthreads();
    return red[0];
}

__device__ float block_max(float v, float* red) {
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, off));
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = threadIdx.x < warps ? red[threadIdx.x] : NEG_INF_F;
    if (warp == 0)
        for (int off = 16; off > 0; off >>= 1)
            v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, off));
    if (threadIdx.x == 0) red[0] = v;
    __syncthreads();
    return red[0];
}

extern "C" __global__ void embed_row(const float* tok_emb, const float* pos_emb,
                                     const long long* token, const long long* pos,
                                     float* y, int d) {
    const float* a = tok_emb + (size_t)(*token) * d;
    const float* b = pos_emb + (size_t)(*pos) * d;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < d; i += gridDim.x * blockDim.x)
        y[i] = a[i] + b[i];
}

/* One block per head; qkv is (1, 3d); caches (H, max_len, dh); out (1, d). */
extern "C" __global__ void attend_row(const float* qkv, float* kc, float* vc,
                                      const long long* pos_p, float* out,
                                      int d, int dh, int max_len, int rows, float scale) {
    extern __shared__ float sh[];  /* rows weights, then 32 for reductions */
    float* w = sh;
    float* red = sh + rows;
    int h = blockIdx.x;
    long long at = *pos_p;
    if (at < 0 || at >= rows) return;  /* never past the bucket (nor the cache); the host checks */
    int pos = (int)at;
    const float* q = qkv + h * dh;
    float* kh = kc + (size_t)h * max_len * dh;
    float* vh = vc + (size_t)h * max_len * dh;
    for (int t = threadIdx.x; t < dh; t += blockDim.x) {
        kh[(size_t)pos * dh + t] = qkv[d + h * dh + t];
        vh[(size_t)pos * dh + t] = qkv[2 * d + h * dh + t];
    }
    __syncthreads();  /* the block's own cache writes are visible to it from here */
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (int r = warp; r < rows; r += warps) {
        float s = 0.0f;
        if (r <= pos) {
            for (int t = lane; t < dh; t += 32) s += q[t] * kh[(size_t)r * dh + t];
            for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
        }
        if (lane == 0) w[r] = r <= pos ? s * scale : NEG_INF_F;
    }
    __syncthreads();
    float m = NEG_INF_F;
    for (int r = threadIdx.x; r <= pos; r += blockDim.x) m = fmaxf(m, w[r]);
    m = block_max(m, red);
    float total = 0.0f;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) {
        float e = r <= pos ? expf(w[r] - m) : 0.0f;
        w[r] = e;
        total += e;
    }
    total = block_sum(total, red);  /* its barriers also publish w */
    for (int t = threadIdx.x; t < dh; t += blockDim.x) {
        float acc = 0.0f;
        for (int r = 0; r <= pos; ++r) acc += w[r] * vh[(size_t)r * dh + t];
        out[h * dh + t] = acc / total;
    }
}

/* numpy.argmax's order: NaN above everything, then by value; the lower index on ties. */
__device__ bool better(double v, int i, double bv, int bi) {
    if (isnan(v)) return !isnan(bv) || i < bi;
    if (isnan(bv)) return false;
    return v > bv || (v == bv && i < bi);
}

/* One block, after the step at position p = *pos. While the prompt lasts (p + 1 below
   *prompt_len) the next token is the prompt's: prompt[p + 1]. Otherwise the host's
   arithmetic in float64: row = logits, row[bos] = -inf, then argmax(row) (temperature 0)
   or argmax(row / temperature + noise[n % chunk]); ties go to the lower index, as
   numpy.argmax; the token is written to out_host[n % cap] and n moves on. Either way the
   token goes to the next step's input and pos moves on by one. */
extern "C" __global__ void sample_row(const float* logits, const double* noise,
                                      const double* temperature, long long* token,
                                      long long* pos, long long* n,
                                      const long long* prompt, const long long* prompt_len,
                                      unsigned long long out_addr, int cap,
                                      int vocab, int chunk, int bos) {
    long long p = *pos, plen = *prompt_len;
    __syncthreads();  /* every thread has read pos before thread 0 writes it */
    if (p + 1 < plen) {  /* the same for every thread: the block leaves together */
        if (threadIdx.x == 0) {
            *token = prompt[p + 1];
            *pos = p + 1;
        }
        return;
    }
    __shared__ double best_v[256];
    __shared__ int best_i[256];
    double temp = *temperature;
    long long k = *n;
    const double* g = noise + (size_t)(k % chunk) * vocab;
    double bv = NEG_INF_D;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        double v = i == bos ? NEG_INF_D : (double)logits[i];
        if (temp > 0.0) v = v / temp + g[i];
        if (better(v, i, bv, bi)) { bv = v; bi = i; }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        int t = threadIdx.x;
        if (t < stride) {
            double ov = best_v[t + stride];
            int oi = best_i[t + stride];
            if (better(ov, oi, best_v[t], best_i[t])) {
                best_v[t] = ov;
                best_i[t] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        int tok = best_i[0];
        *token = tok;
        ((int*)out_addr)[k % cap] = tok;
        *pos = p + 1;
        *n = k + 1;
    }
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


def vecmat(xp: Any, x: Any, w: Any, bias: Any = None, residual: Any = None) -> Any:
    """``residual + x @ w + bias`` for one row ``x`` (``(1, K)``) and ``w`` ``(K, N)``
    (``bias`` and ``residual`` optional)."""
    if not _native(xp, x, w):
        y = x @ w
        if bias is not None:
            y = y + bias
        return y if residual is None else residual + y
    k, n = w.shape
    if residual is not None:  # the partial sums are added onto residual + bias
        y = residual + bias.reshape(1, n) if bias is not None else residual.copy()
    elif bias is not None:
        y = xp.array(bias.reshape(1, n), dtype=xp.float32)
    else:
        y = xp.zeros((1, n), dtype=xp.float32)
    grid = ((n + THREADS - 1) // THREADS, (k + ROWS - 1) // ROWS)
    _kernels(xp).get_function("vecmat")(
        grid, (THREADS,), (x, w, y, xp.int32(k), xp.int32(n), xp.int32(ROWS))
    )
    return y


def vecmat_t(xp: Any, x: Any, e: Any, out: Any = None) -> Any:
    """``x @ e.T`` for one row ``x`` (``(1, K)``) and ``e`` ``(N, K)``; into ``out``
    (``N`` float32) when given."""
    n, k = e.shape
    if not _native(xp, x, e) or (out is not None and not _native(xp, out)):
        y = x @ e.T
        if out is None:
            return y
        out[...] = y.reshape(out.shape)
        return out
    y = xp.empty((1, n), dtype=xp.float32) if out is None else out
    warps_per_block = THREADS // 32
    grid = ((n + warps_per_block - 1) // warps_per_block,)
    _kernels(xp).get_function("vecmat_t")(grid, (THREADS,), (x, e, y, xp.int32(k), xp.int32(n)))
    return y


def layer_norm_row(xp: Any, x: Any, g: Any, b: Any, eps: float = 1e-5) -> Any:
    """LayerNorm of one row ``x`` (``(1, d)``): one block, one kernel."""
    if not _native(xp, x, g, b):
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


def embed_row(xp: Any, tok_emb: Any, pos_emb: Any, token: Any, pos: Any) -> Any:
    """``tok_emb[token] + pos_emb[pos]`` as ``(1, d)``; ``token`` and ``pos`` are ``(1,)``
    int64 device arrays."""
    if not _native(xp, tok_emb, pos_emb):
        return xp.take(tok_emb, token, axis=0) + xp.take(pos_emb, pos, axis=0)
    d = tok_emb.shape[1]
    y = xp.empty((1, d), dtype=xp.float32)
    blocks = (d + 255) // 256
    _kernels(xp).get_function("embed_row")(
        (blocks,), (256,), (tok_emb, pos_emb, token, pos, y, xp.int32(d))
    )
    return y


ATTEND_THREADS = 128
MAX_ATTEND_ROWS = 8192  # a weight per row in shared memory: 32 KiB of a block's 48 KiB


def attend_row(xp: Any, qkv: Any, kc: Any, vc: Any, pos: Any, rows: int) -> Any:
    """One token's attention over the first ``rows`` rows of a cache (``(1, d)``).

    ``qkv`` is ``(1, 3d)``; the caches ``kc``/``vc`` are ``(H, max_len, dh)``; ``pos`` is a
    ``(1,)`` int64 device array below ``rows``. The token's key and value are written into
    cache row ``pos`` first; rows after ``pos`` are masked out.
    """
    n_heads, max_len, dh = kc.shape
    d = n_heads * dh
    if not (_native(xp, qkv, kc, vc) and rows <= MAX_ATTEND_ROWS):
        return _attend_arrays(xp, qkv, kc[:, :rows], vc[:, :rows], pos, n_heads)
    out = xp.empty((1, d), dtype=xp.float32)
    _kernels(xp).get_function("attend_row")(
        (n_heads,),
        (ATTEND_THREADS,),
        (
            qkv,
            kc,
            vc,
            pos,
            out,
            xp.int32(d),
            xp.int32(dh),
            xp.int32(max_len),
            xp.int32(rows),
            xp.float32(1.0 / math.sqrt(dh)),
        ),
        shared_mem=(rows + 32) * 4,
    )
    return out


def _attend_arrays(xp: Any, qkv: Any, kc: Any, vc: Any, pos: Any, n_heads: int) -> Any:
    """:func:`attend_row` in array operations (``kc``/``vc`` already cut to the rows).

    Products and sums rather than :func:`layers.attention`: its ``matmul`` is cuBLAS under
    CuPy, which CuPy refuses while a graph is captured (buckets past
    :data:`MAX_ATTEND_ROWS` come here on CUDA too).
    """
    d = qkv.shape[1] // 3
    dh = d // n_heads
    if isinstance(pos, np.ndarray) and not 0 <= int(pos[0]) < kc.shape[1]:  # no device sync
        raise ValueError(f"position {int(pos[0])} outside the {kc.shape[1]} rows attended over")

    def heads(a: Any) -> Any:  # (1, d) -> (H, 1, dh)
        return a.reshape(1, n_heads, dh).transpose(1, 0, 2)

    positions = xp.arange(kc.shape[1], dtype=xp.int64)
    write = (positions == pos)[None, :, None]
    xp.copyto(kc, heads(qkv[:, d : 2 * d]), where=write)
    xp.copyto(vc, heads(qkv[:, 2 * d :]), where=write)
    scores = xp.sum(heads(qkv[:, :d]) * kc, axis=-1) * np.float32(1.0 / math.sqrt(dh))
    weights = softmax(xp, xp.where((positions <= pos)[None, :], scores, np.float32(-1e30)), -1)
    return xp.sum(weights[:, :, None] * vc, axis=1).reshape(1, d)


SAMPLE_THREADS = 256


def sample_row(
    xp: Any,
    logits: Any,
    noise: Any,
    temperature: Any,
    token: Any,
    pos: Any,
    n: Any,
    prompt: Any,
    prompt_len: Any,
    out_host: Any,
    bos: int,
) -> None:
    """The token after the one at ``pos``, on the device; then ``pos`` moves on by one.

    While the prompt lasts (``pos + 1 < prompt_len[0]``) that is ``prompt[pos + 1]``.
    Otherwise token ``n`` of the generation is picked from ``logits`` (``(vocab,)``
    float32): greedy where ``temperature[0]`` is 0, else Gumbel-max over
    ``noise[n % len(noise)]`` — the float64 arithmetic of the host's sampler, so the token is
    the one it would pick — and written to ``out_host[n % len(out_host)]`` (host memory the
    device can write: pinned on CUDA); ``n`` moves on by one. The token is written into
    ``token``, the next step's input.
    """
    chunk, vocab = noise.shape
    cap = len(out_host)
    if not _native(xp, logits):
        p = int(pos[0])
        pos[0] = p + 1
        if p + 1 < int(prompt_len[0]):
            token[0] = prompt[p + 1]
            return
        k = int(n[0])
        row = np.array(logits, dtype=np.float64)
        row[bos] = -np.inf
        t = float(temperature[0])
        if t > 0.0:
            row = row / t + np.asarray(noise[k % chunk])
        tok = int(np.argmax(row))
        token[0] = tok
        out_host[k % cap] = tok
        n[0] = k + 1
        return
    _kernels(xp).get_function("sample_row")(
        (1,),
        (SAMPLE_THREADS,),
        (
            logits,
            noise,
            temperature,
            token,
            pos,
            n,
            prompt,
            prompt_len,
            np.uint64(out_host.ctypes.data),
            xp.int32(cap),
            xp.int32(vocab),
            xp.int32(chunk),
            xp.int32(bos),
        ),
    )
