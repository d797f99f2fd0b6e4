"""Tasks and the two interfaces through which a runtime is given its policies.

A :class:`Task` is one ``ctx.submit(fn, ...)`` call. The runtime executes tasks (its
launchers, ``_launcher.py``) but does not decide their order: a :class:`SchedulingPolicy`
does. The runtime builds its default policy, the :class:`~pygpukit.runtime.Dispatcher`, and
takes another as ``Runtime(policy=...)``. Memory and compute limits over groups of contexts
come from a :class:`PartitionPolicy` given with :meth:`Runtime.use_partitions` (the seed's
:class:`~pygpukit.qos.PartitionManager` is one). Neither interface is filled in by an import.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from ._tiers import QoSPolicy

__all__ = ("PartitionPolicy", "SchedulingPolicy", "Task", "TaskState")


class TaskState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"  # launched: fn runs or its GPU work is in flight
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"  # removed from the queue before launch
    EXPIRED = "expired"  # its deadline passed before it could launch


class Task:
    """One submitted call. ``deliver(value, exc)`` hands the outcome to its caller.

    :ivar key: the launch order among queued tasks: tier rank, then ``priority`` (lower
        first), then ``seq`` (arrival, set when the policy queues it)
    """

    __slots__ = (
        "args",
        "context",
        "cost_key",
        "deadline",
        "deliver",
        "fn",
        "gpu_ms",
        "kwargs",
        "priority",
        "seq",
        "state",
        "t_done",
        "t_gpu_end",
        "t_gpu_start",
        "t_launched",
        "t_queued",
        "tier",
    )

    def __init__(
        self,
        context: Any,
        tier: QoSPolicy,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        priority: int,
        deadline: float | None,
        deliver: Callable[[Any, BaseException | None], None],
    ) -> None:
        self.context = context
        self.tier = tier
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.priority = priority
        self.deadline = deadline
        self.deliver = deliver
        self.state = TaskState.QUEUED
        self.seq = 0
        self.t_queued = self.t_launched = self.t_done = 0.0
        # when its GPU work began and ended, on the policy's clock: set while a trace
        # records (Runtime.trace), else 0
        self.t_gpu_start = self.t_gpu_end = 0.0
        self.gpu_ms = 0.0
        self.cost_key: Any = None  # what the launcher knows fn by (inline and batching)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.tier.rank, self.priority, self.seq)

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"<Task {name} ctx={getattr(self.context, 'name', '?')} {self.state.value}>"


class SchedulingPolicy(Protocol):
    """Decides when each submitted task launches. Thread-safe; never blocks.

    The runtime calls :meth:`bind` once, then :meth:`enqueue` for every ``submit``; the
    policy calls ``launch(task)`` (after marking it ``RUNNING``) when the task may run, and
    fails tasks it will never launch through ``task.deliver(None, error)``. The runtime calls
    :meth:`finished` once the task's GPU work has run.
    """

    #: the policy's only source of time; ``submit(deadline=...)`` is on this clock
    clock: Callable[[], float]

    def bind(
        self, launch: Callable[[Task], None], over_share: Callable[[Task], bool] | None
    ) -> None:
        """Called once by the runtime that uses this policy."""
        ...

    def enqueue(self, task: Task) -> None:
        """Queue ``task`` (and launch what may run). May raise ``QueueFull``."""
        ...

    def cancel(self, task: Task) -> bool:
        """Take a queued task out; ``False`` if it already launched or ended."""
        ...

    def expire(self, task: Task) -> bool:
        """Fail a queued task whose deadline passed; ``False`` if it already launched."""
        ...

    def finished(self, task: Task, value: Any, exc: BaseException | None) -> None:
        """The task's GPU work has run (or failed): free its place and deliver."""
        ...

    def queued(self) -> list[Task]:
        """Waiting tasks in launch order."""
        ...

    def counts(self, context: Any) -> tuple[int, int]:
        """``(queued, in flight)`` tasks of ``context``."""
        ...

    def forget(self, context: Any) -> None:
        """``context`` was destroyed and has nothing queued or in flight any more."""
        ...


@runtime_checkable
class PartitionPolicy(Protocol):
    """Groups of contexts under shared memory and compute limits (``partition=`` ids).

    Memory calls come from allocation paths and finalizers: they must be quick and must
    not take locks that allocation holds.
    """

    def attach(self, partition: str, context: str) -> None:
        """A context joins ``partition``; raises if the partition does not exist."""
        ...

    def detach(self, partition: str, context: str) -> None: ...

    def charge(self, partition: str, context: str, nbytes: int) -> None:
        """Charge ``nbytes`` before they are allocated; raise to refuse them."""
        ...

    def release(self, partition: str, nbytes: int) -> None: ...

    def over_share(self, partition: str) -> bool:
        """Whether ``partition`` used more than its compute share of recent GPU time."""
        ...

    def record_gpu_time(self, partition: str, seconds: float) -> None: ...
