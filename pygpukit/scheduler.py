"""The seed's module-level scheduler API, over one process-wide default :class:`Runtime`.

``initialize()`` creates the default runtime; every other function here creates it on first
use (device 0, backend ``"auto"``) if ``initialize()`` was not called. Tests and multi-GPU
programs build :class:`~pygpukit.runtime.Runtime` objects directly instead.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from ._exceptions import InvalidArgument as _InvalidArgument
from ._exceptions import InvalidArgumentType as _InvalidArgumentType
from ._units import GB, KB, MB
from .runtime import ExecutionContext as _ExecutionContext
from .runtime import QoSPolicy, context_session
from .runtime import Runtime as _Runtime
from .runtime import hook_future_loops as _hook_future_loops

if TYPE_CHECKING:
    from .runtime import ContextUsage, Event, ExecutionContext, PressureHandler, Runtime, Stream

__all__ = (
    "GB",
    "KB",
    "MB",
    "QoSPolicy",
    "context_session",
    "create_context",
    "destroy_context",
    "get_available_vram",
    "get_context_usage",
    "get_runtime",
    "get_stream",
    "initialize",
    "on_memory_pressure",
    "record_event",
    "shutdown",
    "wait_event",
)

_default: Runtime | None = None
_lock = threading.Lock()


def initialize(
    device_id: int = 0, backend: str = "auto", *, vram_limit: int | None = None
) -> Runtime:
    """Create the default runtime on ``device_id`` (idempotent for the same device).

    Also hooks event loops created from now on, so every task binds its context's stream
    at each step.

    :raises InvalidArgument: already initialized on another device or backend
    """
    global _default
    with _lock:
        if _default is not None and not _default._closed:
            same = _default.device.device_id == device_id and backend in (
                "auto",
                _default.backend.name,
            )
            if not same:
                raise _InvalidArgument(
                    f"the default runtime already runs on {_default.backend.name} device "
                    f"{_default.device.device_id}; call shutdown() before initializing "
                    "another"
                )
            return _default
        _default = _Runtime(device_id, backend, vram_limit=vram_limit)
    _hook_future_loops()
    return _default


def get_runtime() -> Runtime:
    """The default runtime, created with defaults if ``initialize()`` was not called."""
    rt = _default
    if rt is None or rt._closed:
        return initialize()
    return rt


def shutdown() -> None:
    """Destroy the default runtime's contexts and forget it; idempotent."""
    global _default
    with _lock:
        rt, _default = _default, None
    if rt is not None:
        rt.close()


def create_context(
    name: str,
    max_vram: int,
    base_vram: int | None = None,
    qos: QoSPolicy | str = QoSPolicy.BURSTABLE,
    device_id: int | None = None,
    partition: str | None = None,
) -> ExecutionContext:
    """Create an execution context on the default runtime (see :meth:`Runtime.create_context`)."""
    rt = get_runtime()
    if device_id is not None and device_id != rt.device.device_id:
        raise _InvalidArgument(
            f"device_id={device_id} but the default runtime runs on device "
            f"{rt.device.device_id}; build a Runtime(device_id={device_id}) for another GPU"
        )
    return rt.create_context(name, max_vram, base_vram=base_vram, qos=qos, partition=partition)


def _runtime_of(ctx: object, what: str) -> Runtime:
    if not isinstance(ctx, _ExecutionContext):
        raise _InvalidArgumentType(
            f"{what}() takes an ExecutionContext, not {type(ctx).__name__}; "
            "create one with create_context(name, max_vram=...)"
        )
    rt = ctx.runtime
    assert isinstance(rt, _Runtime)  # every context is made by a Runtime
    return rt


def destroy_context(ctx: ExecutionContext) -> None:
    """Destroy ``ctx``: finish its work, release its reservation; idempotent."""
    _runtime_of(ctx, "destroy_context").destroy_context(ctx)


def get_stream(ctx: ExecutionContext) -> Stream:
    """The context's own stream (awaitable; speaks ``__cuda_stream__`` on CUDA)."""
    _runtime_of(ctx, "get_stream")
    ctx._check_open()
    return ctx.stream


def record_event(ctx: ExecutionContext) -> Event:
    """An event after the work enqueued on ``ctx``'s stream so far."""
    _runtime_of(ctx, "record_event")
    return ctx.record_event()


def wait_event(ctx: ExecutionContext, event: Event) -> None:
    """Make ``ctx``'s later work wait for ``event``; the host does not block."""
    _runtime_of(ctx, "wait_event")
    ctx.wait_event(event)


def get_available_vram() -> int:
    """Unreserved device memory not in use (drops when a Guaranteed context reserves)."""
    return get_runtime().available_vram()


def get_context_usage(ctx: ExecutionContext) -> ContextUsage:
    """Memory and activity of ``ctx`` now (``used``, ``max``, ``base``, ``reserved``, ``peak``)."""
    _runtime_of(ctx, "get_context_usage")
    return ctx.usage()


def on_memory_pressure(handler: PressureHandler) -> PressureHandler:
    """Register ``handler(ctx, requested, available) -> bool`` on the default runtime.

    It is called when an allocation does not fit: ``False`` rejects it, ``True`` lets the
    runtime make room and retry. Usable as a decorator.
    """
    return get_runtime().on_memory_pressure(handler)
