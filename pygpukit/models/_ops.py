"""Elementwise and reduction functions written once against an array namespace ``xp``.

The leaf of :mod:`pygpukit.models`: the layers use them, and the fused decode kernels
(``_gemv.py``) fall back to them where no CUDA kernel applies.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ("gelu", "layer_norm", "softmax")


def layer_norm(xp: Any, x: Any, g: Any, b: Any, eps: float = 1e-5) -> Any:
    mu = xp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    var = xp.mean(xc * xc, axis=-1, keepdims=True)
    return xc / xp.sqrt(var + eps) * g + b


def gelu(xp: Any, x: Any) -> Any:
    """GELU, tanh approximation (GPT-2's)."""
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + xp.tanh(c * (x + 0.044715 * (x * x * x))))


def softmax(xp: Any, x: Any, axis: int = -1) -> Any:
    z = x - xp.max(x, axis=axis, keepdims=True)
    e = xp.exp(z)
    return e / xp.sum(e, axis=axis, keepdims=True)
