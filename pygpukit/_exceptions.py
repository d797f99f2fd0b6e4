"""pygpukit's exceptions, all in one place.

The tree::

    PygpukitError
    ├── BackendUnavailable (also LookupError)  -- the asked-for backend cannot run here
    ├── CudaError                              -- the device reported an error
    ├── ContextError                           -- misuse of an execution context
    │   ├── ContextClosed                      -- used after destroy_context()/close()
    │   └── DuplicateContextName
    ├── VRAMBudgetExceeded (also MemoryError)  -- an allocation was refused by a budget
    ├── AdmissionRejected                      -- a reservation cannot be granted
    ├── QueueFull                              -- a bounded queue is at its limit
    ├── DeadlineExceeded (also TimeoutError)   -- work could not start before its deadline
    └── PipelineValidationError (also ValueError)

Argument errors are ``TypeError`` / ``ValueError`` subclasses as well, so callers that
catch the built-in kinds keep working. Messages are built from structured fields in
``__init__`` so the same failure always reads the same way.
"""

from __future__ import annotations

from typing import Any

__all__ = (
    "AdmissionRejected",
    "BackendUnavailable",
    "ContextClosed",
    "ContextError",
    "CudaError",
    "DeadlineExceeded",
    "DuplicateContextName",
    "InvalidArgument",
    "PipelineValidationError",
    "PygpukitError",
    "QueueFull",
    "VRAMBudgetExceeded",
)


def _fmt_bytes(n: int) -> str:
    """Render a byte count the way users wrote it (``4 GiB``, ``512 MiB``, ``100 B``)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.2f} {unit}"
    return f"{n} B"


class PygpukitError(Exception):
    """Root of every error pygpukit raises on purpose."""


class InvalidArgument(PygpukitError, ValueError):
    """An argument breaks a documented rule; the message states the rule and the fix."""


class BackendUnavailable(PygpukitError, LookupError):
    """The requested backend cannot run on this machine."""


class CudaError(PygpukitError):
    """The CUDA device reported an error (a faulted context, a failed call).

    :ivar status: the CUDA error code, when one is known
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class ContextError(PygpukitError):
    """An execution context was used against its rules."""


class ContextClosed(ContextError):
    """The execution context was destroyed and can no longer be used."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"context {name!r} was destroyed; create a new context with "
            "create_context() instead of reusing a destroyed one"
        )


class DuplicateContextName(ContextError, ValueError):
    """A live context already has this name."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"a context named {name!r} already exists; pick another name or "
            f"destroy_context() the existing one first"
        )


class VRAMBudgetExceeded(PygpukitError, MemoryError):
    """An allocation was refused because it does not fit its context's budget.

    :ivar context: name of the context that asked (``None`` outside any session)
    :ivar requested: bytes asked for
    :ivar available: bytes the context could still get when it asked
    :ivar budget: the context's ``max_vram``
    """

    def __init__(
        self, context: str | None, requested: int, available: int, budget: int, reason: str = ""
    ) -> None:
        self.context = context
        self.requested = requested
        self.available = available
        self.budget = budget
        self.reason = reason
        who = f"context {context!r}" if context is not None else "unscoped allocation"
        detail = f" ({reason})" if reason else ""
        super().__init__(
            f"{who} asked for {_fmt_bytes(requested)} but only {_fmt_bytes(available)} "
            f"is available within its budget of {_fmt_bytes(budget)}{detail}; free arrays, "
            "allocate less, or create the context with a larger max_vram"
        )


class AdmissionRejected(PygpukitError):
    """A context or task could not be admitted (its reservation cannot be granted)."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what} was not admitted: {reason}")


class QueueFull(PygpukitError):
    """A bounded queue is full; retry later or raise its limit."""


class DeadlineExceeded(PygpukitError, TimeoutError):
    """Work could not start (or finish) before its deadline."""


class PipelineValidationError(PygpukitError, ValueError):
    """A pipeline graph is malformed; the message names the stage and field."""


def _fix_module(namespace: dict[str, Any]) -> None:
    """Make tracebacks read ``pygpukit.VRAMBudgetExceeded`` rather than the private path."""
    for name in __all__:
        namespace[name].__module__ = "pygpukit"


_fix_module(globals())
