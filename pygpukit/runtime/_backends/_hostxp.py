"""``pygpukit.xp`` on the host backend: NumPy whose array constructors charge budgets.

On CUDA, ``pygpukit.xp`` is CuPy itself and *every* allocation goes through the routed
allocator. NumPy has no Python-level allocator hook, so here the constructors below take
their memory from the routed allocator (the calling task's context pool) and everything
else is plain NumPy. Results of other operations (``a @ b``) are not charged on the host
backend; docs/adr/0007 records this difference.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np

from ..._exceptions import InvalidArgument, InvalidArgumentType

__all__ = ("HostXP",)


def _shape(shape: Any) -> tuple[int, ...]:
    """``shape`` as NumPy reads it: one integer or a sequence of them, none negative.

    :raises InvalidArgumentType: not an integer or a sequence of integers (``2.5``, ``True``)
    :raises InvalidArgument: a negative dimension
    """
    try:
        if isinstance(shape, bool):  # an int to Python, never a dimension to NumPy
            raise TypeError
        try:
            dims: tuple[int, ...] = (operator.index(shape),)
        except TypeError:
            dims = tuple(_dim(s) for s in shape)
    except TypeError:
        raise InvalidArgumentType(
            f"shape must be an integer or a sequence of integers (as NumPy takes it), not {shape!r}"
        ) from None
    if any(d < 0 for d in dims):
        raise InvalidArgument(
            f"negative dimensions are not allowed, got shape {dims}; pass sizes >= 0"
        )
    return dims


def _dim(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError
    return operator.index(value)


class HostXP:
    """A NumPy namespace; see the module docstring."""

    __name__ = "pygpukit.xp[host]"

    def __init__(self) -> None:
        self._router: Callable[[int], Any] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)

    def __repr__(self) -> str:
        return "<pygpukit.xp: NumPy with budgeted constructors (host backend)>"

    def _take(self, shape: Any, dtype: Any) -> np.ndarray[Any, Any]:
        dt = np.dtype(dtype)
        shape_t = _shape(shape)  # before any charge: a bad shape takes nothing
        nbytes = math.prod(shape_t) * dt.itemsize
        if self._router is None:
            return np.empty(shape_t, dtype=dt)
        buf: np.ndarray[Any, Any] = self._router(nbytes)
        out: np.ndarray[Any, Any] = buf[:nbytes].view(dt).reshape(shape_t)
        return out

    def empty(self, shape: Any, dtype: Any = float) -> np.ndarray[Any, Any]:
        return self._take(shape, dtype)

    def zeros(self, shape: Any, dtype: Any = float) -> np.ndarray[Any, Any]:
        a = self._take(shape, dtype)
        a.fill(0)
        return a

    def ones(self, shape: Any, dtype: Any = float) -> np.ndarray[Any, Any]:
        a = self._take(shape, dtype)
        a.fill(1)
        return a

    def full(self, shape: Any, fill_value: Any, dtype: Any = None) -> np.ndarray[Any, Any]:
        a = self._take(shape, dtype if dtype is not None else np.asarray(fill_value).dtype)
        a.fill(fill_value)
        return a

    def empty_like(self, a: Any, dtype: Any = None) -> np.ndarray[Any, Any]:
        return self._take(np.shape(a), dtype or np.asarray(a).dtype)

    def zeros_like(self, a: Any, dtype: Any = None) -> np.ndarray[Any, Any]:
        return self.zeros(np.shape(a), dtype or np.asarray(a).dtype)

    def ones_like(self, a: Any, dtype: Any = None) -> np.ndarray[Any, Any]:
        return self.ones(np.shape(a), dtype or np.asarray(a).dtype)

    def full_like(self, a: Any, fill_value: Any, dtype: Any = None) -> np.ndarray[Any, Any]:
        return self.full(np.shape(a), fill_value, dtype or np.asarray(a).dtype)

    def array(self, obj: Any, dtype: Any = None, copy: bool = True) -> np.ndarray[Any, Any]:
        src = np.asarray(obj, dtype=dtype)
        if not copy and isinstance(obj, np.ndarray) and src is obj:
            return src
        out = self._take(src.shape, src.dtype)
        out[...] = src
        return out

    def asarray(self, obj: Any, dtype: Any = None) -> np.ndarray[Any, Any]:
        """Like ``cupy.asarray``: arrays already on the device are returned as they are."""
        if isinstance(obj, np.ndarray) and (dtype is None or np.dtype(dtype) == obj.dtype):
            return obj
        return self.array(obj, dtype=dtype)

    def ascontiguousarray(self, a: Any, dtype: Any = None) -> np.ndarray[Any, Any]:
        arr = self.asarray(a, dtype)
        return arr if arr.flags.c_contiguous else self.array(arr)

    def arange(self, *args: Any, dtype: Any = None) -> np.ndarray[Any, Any]:
        return self.array(np.arange(*args, dtype=dtype))

    def eye(self, n: int, m: int | None = None, dtype: Any = float) -> np.ndarray[Any, Any]:
        return self.array(np.eye(n, m, dtype=dtype))

    def asnumpy(self, a: Any) -> np.ndarray[Any, Any]:
        """Host copy of ``a`` (the name CuPy uses)."""
        return np.array(a, copy=True)
