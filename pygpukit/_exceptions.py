"""pygpukit's exceptions, all in one place.

The tree::

    PygpukitError
    ├── InvalidArgument (also ValueError)      -- an argument's value breaks a rule
    ├── InvalidArgumentType (also TypeError)   -- an argument has the wrong type
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

Argument errors keep Python's categories: a wrong type is an :class:`InvalidArgumentType`
(a ``TypeError``), a wrong value an :class:`InvalidArgument` (a ``ValueError``), so callers
that catch the built-in kinds keep working. The errors that carry facts
(:class:`VRAMBudgetExceeded`, :class:`AdmissionRejected`, :class:`DeadlineExceeded`) build
their messages from structured fields in ``__init__``, so the same failure always reads the
same way, with advice that fits its reason.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

__all__ = (
    "AdmissionRejected",
    "BackendUnavailable",
    "BudgetReason",
    "ContextClosed",
    "ContextError",
    "CudaError",
    "DeadlineExceeded",
    "DuplicateContextName",
    "InvalidArgument",
    "InvalidArgumentType",
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

    # What __init__ was called with, for the errors that build their message from fields.
    _init: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    def __reduce__(self) -> Any:
        # Such an error's args hold only the finished message, which its __init__ does not
        # take: rebuild it from its fields instead (pickling to another process, copy).
        if self._init is None:
            return super().__reduce__()
        args, kwargs = self._init
        return (_rebuild, (type(self), args, kwargs))


def _rebuild(cls: type[PygpukitError], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return cls(*args, **kwargs)


class InvalidArgument(PygpukitError, ValueError):
    """An argument's value breaks a documented rule; the message states the rule and the fix."""


class InvalidArgumentType(PygpukitError, TypeError):
    """An argument has the wrong type; the message names the type expected and the fix."""


class BackendUnavailable(PygpukitError, LookupError):
    """The requested backend cannot run on this machine."""


class CudaError(PygpukitError):
    """The CUDA device reported an error (a faulted context, a failed call).

    :ivar status: the CUDA error code, when one is known
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        self._init = (message, status), {}
        super().__init__(message)


class ContextError(PygpukitError):
    """An execution context was used against its rules."""


class ContextClosed(ContextError):
    """The execution context was destroyed and can no longer be used."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._init = (name,), {}
        super().__init__(
            f"context {name!r} was destroyed; create a new context with "
            "create_context() instead of reusing a destroyed one"
        )


class DuplicateContextName(ContextError, ValueError):
    """A live context already has this name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._init = (name,), {}
        super().__init__(
            f"a context named {name!r} already exists; pick another name or "
            f"destroy_context() the existing one first"
        )


class BudgetReason(enum.StrEnum):
    """Why a :class:`VRAMBudgetExceeded` was raised; each reason has its own advice."""

    #: the request would take the context past its ``max_vram``
    MAX_VRAM = "past max_vram"
    #: a memory-pressure handler returned ``False`` instead of letting the runtime make room
    HANDLER = "a memory-pressure handler refused"
    #: the tier draws on unreserved memory (a burst, BestEffort, unscoped) and too little is left
    UNRESERVED = "not enough unreserved memory"
    #: the context's partition is at its memory limit
    PARTITION = "partition memory limit"
    #: a :class:`~pygpukit.lowlevel.MemoryPool` is at its quota and does not evict
    QUOTA = "MemoryPool quota"
    #: the reservation has room in total, but not in one piece
    FRAGMENTED = "its reserved memory is fragmented"


def _callable_name(fn: object) -> str:
    if isinstance(fn, str):  # a name already (an error rebuilt from its fields)
        return fn
    return str(getattr(fn, "__qualname__", None) or repr(fn))


class VRAMBudgetExceeded(PygpukitError, MemoryError):
    """An allocation was refused because it does not fit its context's budget.

    The message is built from the fields, with advice that fits the :attr:`reason`.

    :ivar context: name of the context that asked (``None`` outside any session)
    :ivar requested: bytes asked for
    :ivar available: bytes the context could still get when it asked
    :ivar budget: the limit that applied: the context's ``max_vram``, the partition's memory
        limit (:attr:`BudgetReason.PARTITION`), the pool's quota (:attr:`BudgetReason.QUOTA`),
        or the reservation's size (:attr:`BudgetReason.FRAGMENTED`)
    :ivar reason: a :class:`BudgetReason`; a text that names none (from code written
        against an older version) is kept as it is and gets the ``max_vram`` advice
    :ivar tier: :attr:`BudgetReason.UNRESERVED`: the name of the context's tier (``None``
        for an allocation outside any session)
    :ivar handler: :attr:`BudgetReason.HANDLER`: the name of the handler that refused
    :ivar partition: :attr:`BudgetReason.PARTITION`: the partition's id
    """

    def __init__(
        self,
        context: str | None,
        requested: int,
        available: int,
        budget: int,
        reason: BudgetReason | str = BudgetReason.MAX_VRAM,
        *,
        tier: object = None,
        handler: object = None,
        partition: str | None = None,
    ) -> None:
        if not isinstance(reason, BudgetReason):
            try:
                reason = BudgetReason(reason)
            except ValueError:
                pass  # a free text: kept, with the max_vram advice
        self.context = context
        self.requested = requested
        self.available = available
        self.budget = budget
        self.reason: BudgetReason | str = reason
        self.tier: str | None = None if tier is None else str(getattr(tier, "name", tier))
        self.handler: str | None = None if handler is None else _callable_name(handler)
        self.partition = partition
        self._init = (
            (context, requested, available, budget, reason),
            {"tier": self.tier, "handler": self.handler, "partition": partition},
        )
        super().__init__(self._message())

    def _message(self) -> str:
        if self.context is not None:
            who = f"context {self.context!r}"
        elif self.reason is BudgetReason.QUOTA:
            who = "a MemoryPool allocation"
        else:
            who = "an allocation outside any context"
        head = (
            f"{who} asked for {_fmt_bytes(self.requested)} but only "
            f"{_fmt_bytes(self.available)} is available"
        )
        budget = _fmt_bytes(self.budget)
        reason = self.reason
        if reason is BudgetReason.HANDLER:
            refuser = (
                f"the memory-pressure handler {self.handler}()"
                if self.handler
                else "a memory-pressure handler"
            )
            return (
                f"{head} (its max_vram is {budget}) and {refuser} refused to let the runtime "
                "make room; free memory in other contexts, or change the handler registered "
                "with on_memory_pressure()"
            )
        if reason is BudgetReason.UNRESERVED:
            if self.tier is None:
                return (
                    f"{head}: an allocation outside any context takes its memory from "
                    "unreserved memory, and not enough is unreserved; free memory elsewhere, "
                    "or allocate inside the context_session() of a context that reserves it"
                )
            source = (
                "all its memory"
                if self.tier == "BEST_EFFORT"
                else "the memory beyond its base_vram"
                if self.tier == "BURSTABLE"
                else "the memory beyond its reservation"
            )
            return (
                f"{head} (its max_vram is {budget}): a {self.tier} context takes {source} "
                "from unreserved memory, and not enough is unreserved; free memory elsewhere, "
                "reserve it up front (a larger base_vram, or qos=QoSPolicy.GUARANTEED), or "
                "lower other contexts' reservations"
            )
        if reason is BudgetReason.PARTITION:
            return (
                f"{head} within the {budget} memory limit of partition {self.partition!r}; free "
                "memory in the partition's contexts, or give the partition a larger memory limit"
            )
        if reason is BudgetReason.QUOTA:
            return (
                f"{head} within its MemoryPool quota of {budget}; free blocks, or create the "
                "pool with a larger quota or with enable_eviction=True to spill to the host"
            )
        if reason is BudgetReason.FRAGMENTED:
            return (
                f"{head} in one piece of its {budget} reservation ({reason}); free neighbouring "
                "arrays, allocate smaller pieces, or create the context with a larger max_vram"
            )
        return (
            f"{head} within its budget of {budget} ({reason}); free arrays, allocate less, "
            "or create the context with a larger max_vram"
        )


class AdmissionRejected(PygpukitError):
    """A context or task could not be admitted (its reservation cannot be granted)."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        self._init = (what, reason), {}
        super().__init__(f"{what} was not admitted: {reason}")


class QueueFull(PygpukitError):
    """A bounded queue is full; retry later or raise its limit."""


class DeadlineExceeded(PygpukitError, TimeoutError):
    """Work could not start, or finish, before its deadline.

    :ivar what: the work, e.g. ``"task 'step' of context 'llm'"`` or ``"pipeline 'chat'"``
    :ivar late_s: seconds past the deadline when it was given up
    :ivar cancelled: ``None`` if it never started (nothing ran); else the names of the parts
        still running that were cancelled (a pipeline's stages)
    """

    def __init__(self, what: str, late_s: float, cancelled: Sequence[str] | None = None) -> None:
        self.what = what
        self.late_s = max(0.0, late_s)
        self.cancelled = None if cancelled is None else tuple(cancelled)
        self._init = (what, late_s, self.cancelled), {}
        if self.cancelled is None:
            phase = "before it started (nothing ran)"
        else:
            phase = f"while running (cancelled: {', '.join(map(repr, self.cancelled)) or 'none'})"
        super().__init__(
            f"{what} missed its deadline by {self.late_s * 1e3:.1f} ms {phase}; give it a later "
            "deadline, a higher priority or tier, or less work queued ahead of it"
        )


class PipelineValidationError(PygpukitError, ValueError):
    """A pipeline graph is malformed; the message names the stage and field."""


def _fix_module(namespace: dict[str, Any]) -> None:
    """Make tracebacks read ``pygpukit.VRAMBudgetExceeded`` rather than the private path."""
    for name in __all__:
        namespace[name].__module__ = "pygpukit"


_fix_module(globals())
