"""Building blocks shared by the example models.

Everything here is written once against an array namespace ``xp`` that is passed in:
plain ``numpy``, ``cupy``, or ``pygpukit.xp`` (NumPy with budgeted constructors on the host
backend, CuPy on CUDA). Only functions that NumPy and CuPy both provide are used, and every
array stays ``float32``.

:class:`Model` is the common base: a flat ``name -> array`` parameter dict, random
initialisation from a NumPy ``Generator`` on the host (copied into ``xp`` with ``xp.array``
so the copy is charged to the calling task's context), ``save``/``load`` in ``.npz`` (or
``.safetensors`` when that package is installed), and ``nbytes``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Self

import numpy as np

from ._gemv import attend_row, bias_gelu, layer_norm_row, vecmat
from ._ops import gelu as gelu
from ._ops import layer_norm as layer_norm
from ._ops import softmax as softmax

__all__ = (
    "Model",
    "ParamSpec",
    "attention",
    "conv1d_same",
    "decode_block",
    "encoder_block",
    "gelu",
    "layer_norm",
    "softmax",
    "to_host",
    "transformer_block_specs",
)

F32 = np.float32
_CONFIG_KEY = "__config__"
_CLASS_KEY = "__model__"


def to_host(a: Any) -> np.ndarray[Any, Any]:
    """A NumPy copy/view of ``a`` (``cupy.ndarray.get()`` on CUDA)."""
    get = getattr(a, "get", None)
    if callable(get) and not isinstance(a, np.ndarray):
        return np.asarray(get())
    return np.asarray(a)


# --------------------------------------------------------------------------- functions


def attention(xp: Any, q: Any, k: Any, v: Any, mask: Any = None) -> Any:
    """Scaled dot-product attention over heads.

    ``q``: ``(H, T, dh)``, ``k``/``v``: ``(H, S, dh)``; ``mask`` (``(T, S)`` bool, True =
    visible) or ``None`` for full attention. Returns ``(H, T, dh)``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = xp.matmul(q, xp.swapaxes(k, -1, -2)) * scale
    if mask is not None:
        scores = xp.where(mask[None, :, :], scores, F32(-1e30))
    return xp.matmul(softmax(xp, scores, axis=-1), v)


def conv1d_same(xp: Any, x: Any, w: Any, b: Any, kernel: int) -> Any:
    """1-D convolution over time with 'same' zero padding.

    ``x``: ``(T, C_in)``; ``w``: ``(kernel * C_in, C_out)``; returns ``(T, C_out)``.
    """
    t, c = x.shape
    pad = kernel // 2
    z = xp.zeros((pad, c), dtype=x.dtype)
    zr = xp.zeros((kernel - 1 - pad, c), dtype=x.dtype)
    xpad = xp.concatenate([z, x, zr], axis=0)
    cols = xp.concatenate([xpad[j : j + t] for j in range(kernel)], axis=1)
    return cols @ w + b


# --------------------------------------------------------------------------- blocks


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape and initialisation of one parameter: ``std`` > 0 normal, ``"ones"``, ``"zeros"``."""

    shape: tuple[int, ...]
    init: float | str


def transformer_block_specs(
    prefix: str, d_model: int, d_ff: int, std: float, out_std: float
) -> dict[str, ParamSpec]:
    """Parameters of one pre-LayerNorm block (attention + GELU MLP)."""
    return {
        f"{prefix}.ln1.g": ParamSpec((d_model,), "ones"),
        f"{prefix}.ln1.b": ParamSpec((d_model,), "zeros"),
        f"{prefix}.attn.wqkv": ParamSpec((d_model, 3 * d_model), std),
        f"{prefix}.attn.bqkv": ParamSpec((3 * d_model,), "zeros"),
        f"{prefix}.attn.wo": ParamSpec((d_model, d_model), out_std),
        f"{prefix}.attn.bo": ParamSpec((d_model,), "zeros"),
        f"{prefix}.ln2.g": ParamSpec((d_model,), "ones"),
        f"{prefix}.ln2.b": ParamSpec((d_model,), "zeros"),
        f"{prefix}.mlp.w1": ParamSpec((d_model, d_ff), std),
        f"{prefix}.mlp.b1": ParamSpec((d_ff,), "zeros"),
        f"{prefix}.mlp.w2": ParamSpec((d_ff, d_model), out_std),
        f"{prefix}.mlp.b2": ParamSpec((d_model,), "zeros"),
    }


def _split_heads(x: Any, n_heads: int) -> Any:
    t, d = x.shape
    return x.reshape(t, n_heads, d // n_heads).transpose(1, 0, 2)


def encoder_block(
    xp: Any,
    p: Mapping[str, Any],
    prefix: str,
    x: Any,
    n_heads: int,
    *,
    cache: tuple[Any, Any] | None = None,
    start: int = 0,
    causal: bool = False,
) -> Any:
    """One pre-LayerNorm transformer block on ``x`` (``(T, d)``).

    With ``cache=(K, V)`` (each ``(H, max_len, dh)``) the block writes this chunk's keys and
    values at positions ``start .. start+T`` and attends over ``0 .. start+T`` — the prefix
    is read from the cache, never recomputed. ``causal`` masks future positions.
    """
    t, d = x.shape
    h = layer_norm(xp, x, p[f"{prefix}.ln1.g"], p[f"{prefix}.ln1.b"])
    qkv = h @ p[f"{prefix}.attn.wqkv"] + p[f"{prefix}.attn.bqkv"]
    q = _split_heads(qkv[:, :d], n_heads)
    k = _split_heads(qkv[:, d : 2 * d], n_heads)
    v = _split_heads(qkv[:, 2 * d :], n_heads)
    if cache is not None:
        kc, vc = cache
        kc[:, start : start + t] = k
        vc[:, start : start + t] = v
        k = kc[:, : start + t]
        v = vc[:, : start + t]
    mask = None
    if causal:
        s = k.shape[1]
        qpos = xp.arange(start, start + t)[:, None]
        kpos = xp.arange(s)[None, :]
        mask = kpos <= qpos
    return _block_out(xp, p, prefix, x, attention(xp, q, k, v, mask))


def decode_block(
    xp: Any,
    p: Mapping[str, Any],
    prefix: str,
    x: Any,
    cache: tuple[Any, Any],
    pos: Any,
    rows: int,
) -> Any:
    """:func:`encoder_block` for one token, with shapes that never change.

    The position lives on the device: ``pos`` (``(1,)`` int64) is the cache row this
    token's key and value go to; attention covers cache rows ``0 .. pos`` of the first
    ``rows`` (each cache ``(H, max_len, dh)``). Every step launches the same kernels on the
    same buffers and calls no library routine (the kernels of :mod:`pygpukit.models._gemv`:
    matrix products, LayerNorm, attention, bias+GELU), so a step can be captured once into
    a CUDA graph and replayed.
    """
    h = layer_norm_row(xp, x, p[f"{prefix}.ln1.g"], p[f"{prefix}.ln1.b"])
    qkv = vecmat(xp, h, p[f"{prefix}.attn.wqkv"], p[f"{prefix}.attn.bqkv"])
    a = attend_row(xp, qkv, cache[0], cache[1], pos, rows)
    x = vecmat(xp, a, p[f"{prefix}.attn.wo"], p[f"{prefix}.attn.bo"], residual=x)
    h = layer_norm_row(xp, x, p[f"{prefix}.ln2.g"], p[f"{prefix}.ln2.b"])
    h = bias_gelu(xp, vecmat(xp, h, p[f"{prefix}.mlp.w1"]), p[f"{prefix}.mlp.b1"])
    return vecmat(xp, h, p[f"{prefix}.mlp.w2"], p[f"{prefix}.mlp.b2"], residual=x)


def _block_out(xp: Any, p: Mapping[str, Any], prefix: str, x: Any, a: Any) -> Any:
    """The rest of a block after attention: output projection, residual, MLP."""
    t, d = x.shape
    a = a.transpose(1, 0, 2).reshape(t, d)
    x = x + (a @ p[f"{prefix}.attn.wo"] + p[f"{prefix}.attn.bo"])
    h = layer_norm(xp, x, p[f"{prefix}.ln2.g"], p[f"{prefix}.ln2.b"])
    h = gelu(xp, h @ p[f"{prefix}.mlp.w1"] + p[f"{prefix}.mlp.b1"])
    return x + (h @ p[f"{prefix}.mlp.w2"] + p[f"{prefix}.mlp.b2"])


# --------------------------------------------------------------------------- base model


class Model:
    """Base of the example models: parameters, init, save/load, size.

    Subclasses set ``config_cls`` (a dataclass) and implement :meth:`param_specs`.
    All parameters live in ``self.params`` (``name -> xp array``, float32), allocated
    through ``self.xp`` so that inside a pygpukit context session they are charged to that
    context for as long as the model is alive.
    """

    config_cls: ClassVar[type]

    def __init__(self, config: Any = None, *, xp: Any = np, seed: int = 0) -> None:
        if config is None:
            config = self.config_cls()
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_cls.__name__}, "
                f"got {type(config).__name__}"
            )
        self.config = config
        self.xp = xp
        self.params: dict[str, Any] = {}
        self.init_weights(seed)

    # subclasses --------------------------------------------------------------------
    def param_specs(self) -> dict[str, ParamSpec]:
        raise NotImplementedError

    # weights -----------------------------------------------------------------------
    def init_weights(self, seed: int = 0) -> None:
        """(Re)initialise every parameter from ``numpy.random.default_rng(seed)``.

        Weights are random normal scaled by each parameter's ``std`` (LayerNorm gains ones,
        biases zeros): the models are untrained and their outputs are meaningless but
        deterministic.
        """
        rng = np.random.default_rng(seed)
        params: dict[str, Any] = {}
        for name, spec in self.param_specs().items():
            if spec.init == "ones":
                host = np.ones(spec.shape, dtype=F32)
            elif spec.init == "zeros":
                host = np.zeros(spec.shape, dtype=F32)
            else:
                host = rng.standard_normal(spec.shape, dtype=F32) * F32(spec.init)
            params[name] = self.xp.array(host, dtype=self.xp.float32)
        self.params = params

    @property
    def n_params(self) -> int:
        return sum(int(a.size) for a in self.params.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the weights."""
        return sum(int(a.nbytes) for a in self.params.values())

    def state_dict(self) -> dict[str, np.ndarray[Any, Any]]:
        """Host (NumPy) copies of the weights."""
        return {name: np.array(to_host(a), copy=True) for name, a in self.params.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Copy ``state`` into the weights; names and shapes must match exactly."""
        specs = self.param_specs()
        missing = sorted(set(specs) - set(state))
        extra = sorted(set(state) - set(specs))
        if missing or extra:
            raise ValueError(f"state mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        for name, spec in specs.items():
            arr = np.asarray(state[name])
            if tuple(arr.shape) != spec.shape:
                raise ValueError(f"{name}: shape {arr.shape}, expected {spec.shape}")
            self.params[name][...] = self.xp.asarray(arr.astype(F32, copy=False))

    def _header(self) -> str:
        return json.dumps(dataclasses.asdict(self.config))  # type: ignore[call-overload]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write weights and config to ``path``.

        ``*.safetensors`` uses the ``safetensors`` package (config in the metadata);
        anything else is an ``.npz`` written at exactly ``path``.
        """
        path = os.fspath(path)
        state = self.state_dict()
        if path.endswith(".safetensors"):
            from safetensors.numpy import save_file  # optional dependency

            meta = {_CONFIG_KEY: self._header(), _CLASS_KEY: type(self).__name__}
            save_file(state, path, metadata=meta)
            return
        payload: dict[str, Any] = dict(state)
        payload[_CONFIG_KEY] = np.array(self._header())
        payload[_CLASS_KEY] = np.array(type(self).__name__)
        with open(path, "wb") as f:
            np.savez(f, **payload)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, xp: Any = np) -> Self:
        """A model restored exactly from a file written by :meth:`save`."""
        path = os.fspath(path)
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            from safetensors.numpy import load_file

            with safe_open(path, framework="numpy") as f:
                meta = f.metadata() or {}
            header, kind = meta.get(_CONFIG_KEY), meta.get(_CLASS_KEY)
            state = load_file(path)
        else:
            with np.load(path, allow_pickle=False) as z:
                state = {k: z[k] for k in z.files if k not in (_CONFIG_KEY, _CLASS_KEY)}
                header = str(z[_CONFIG_KEY]) if _CONFIG_KEY in z.files else None
                kind = str(z[_CLASS_KEY]) if _CLASS_KEY in z.files else None
        if header is None:
            raise ValueError(f"{path}: no model config stored")
        if kind is not None and kind != cls.__name__:
            raise ValueError(f"{path} holds a {kind}, not a {cls.__name__}")
        model = cls(cls.config_cls(**json.loads(header)), xp=xp)
        model.load_state_dict(state)
        return model

    from_file = load

    def _iter_blocks(self, n_layers: int) -> Iterator[str]:
        for i in range(n_layers):
            yield f"blocks.{i}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.config}, params={self.n_params:,}, "
            f"nbytes={self.nbytes:,})"
        )
