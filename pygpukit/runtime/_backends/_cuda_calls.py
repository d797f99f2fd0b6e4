"""CuPy, imported here once for the CUDA backend, and how the backend calls it.

The backend (``_cuda.py``) and its device memory (``_cuda_pool.py``) take ``cupy`` and its
runtime module from here, so that a machine without CuPy gets one
:class:`~pygpukit.BackendUnavailable` with the install hint, whichever is imported first.
CuPy's CUDA errors become :class:`~pygpukit.CudaError` at this boundary (:func:`translated`,
:func:`check`), and calls that must not disturb another thread's graph capture run with the
capture mode relaxed (:func:`relaxed`).
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from ..._exceptions import BackendUnavailable, CudaError
from ._base import CudaWarning

try:
    import cupy
    from cupy.cuda import runtime
except ImportError as exc:  # pragma: no cover - exercised on machines without CuPy
    raise BackendUnavailable(
        "the cuda backend needs CuPy >= 14.1; install it with "
        "pip install 'pygpukit-async[cuda12]' (CUDA 12) or 'pygpukit-async[cuda13]' (CUDA 13), "
        "or use backend='host'"
    ) from exc

__all__ = (
    "NOT_READY",
    "OUT_OF_MEMORY",
    "check",
    "cupy",
    "error_name",
    "load_exchange",
    "relaxed",
    "runtime",
    "translated",
    "warn_unraisable",
)

NOT_READY = 600  # cudaErrorNotReady
OUT_OF_MEMORY = 2  # cudaErrorMemoryAllocation (CuPy does not export the name)


class _Translating:
    """Maps CuPy's CUDA errors to ours at the boundary: ``with translated(): ...``.

    A plain class, not a ``contextmanager`` generator: it wraps calls made several times
    per submitted task (event records, timing), where a generator costs about 1 µs more.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> None:
        if kind is not None and issubclass(kind, runtime.CUDARuntimeError):
            raise CudaError(f"CUDA error: {exc}", status=exc.status) from exc  # type: ignore[union-attr]


_TRANSLATING = _Translating()


def translated() -> _Translating:
    return _TRANSLATING


_T = TypeVar("_T")
_exchange_mode: Any = None  # cuThreadExchangeStreamCaptureMode: load_exchange()


def load_exchange() -> None:
    """Load the driver's capture-mode switch, once, when the first backend is made: every
    :func:`relaxed` call (queries in a spin loop among them) then finds it ready."""
    global _exchange_mode
    if _exchange_mode is None:
        exchange = ctypes.CDLL("libcuda.so.1").cuThreadExchangeStreamCaptureMode
        exchange.argtypes = [ctypes.POINTER(ctypes.c_int)]
        exchange.restype = ctypes.c_int
        _exchange_mode = exchange


def relaxed(call: Callable[..., _T], *args: Any) -> _T:
    """``call(*args)`` with this thread's stream capture mode relaxed for the call.

    A query, a synchronization or a pool call made in the default (global) mode while
    another thread captures a graph in global mode (PyTorch's default) invalidates that
    capture — queries even while returning normally (measured on the H200,
    docs/adr/0031). Ours never touch a capturing stream, so relaxing is safe for them.
    Needs a :class:`CudaBackend` made first (:func:`load_exchange`).
    """
    exchange = _exchange_mode
    mode = ctypes.c_int(2)  # CU_STREAM_CAPTURE_MODE_RELAXED; the old mode comes back here
    if exchange(mode) != 0:  # not switched: a second exchange would leave the thread relaxed
        return call(*args)
    try:
        return call(*args)
    finally:
        exchange(mode)  # the thread's own mode again


def check(status: int, what: str) -> bool:
    """``True`` for success, ``False`` for not-ready; raise for a device error."""
    if status == 0:
        return True
    if status == NOT_READY:
        return False
    raise CudaError(
        f"{what} failed: CUDA error {status} ({error_name(status)}); the CUDA context is "
        "unusable after a device fault — restart the process",
        status=status,
    )


def error_name(status: int) -> str:
    try:
        return str(runtime.getErrorName(status))
    except Exception:  # pragma: no cover - an unknown code
        return "unknown"


def warn_unraisable(what: str, exc: BaseException) -> None:
    """Report ``exc`` where no exception can propagate (a finalizer, a free queued from
    one) as a :class:`CudaWarning`, rather than losing it."""
    warnings.warn(f"{what} failed: {exc!r}", CudaWarning, stacklevel=2)
