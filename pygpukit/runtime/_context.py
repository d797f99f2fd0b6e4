"""Execution contexts: one model's stream, budget and statistics."""

from __future__ import annotations

import contextlib
import enum
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .._exceptions import ContextClosed, _fmt_bytes
from .._stats import Histogram
from ._evict import Evictable, EvictableModule, Eviction
from ._tiers import QoSPolicy
from .checks import check_bytes

if TYPE_CHECKING:
    from ._backends import Backend, DeviceInfo, RawPool
    from ._ledger import Account, Ledger
    from ._stream import Event, Stream

__all__ = ("ContextState", "ContextUsage", "ExecutionContext")

#: The context the running task or thread is in a session of: what allocations are charged
#: to and whose stream is bound at every step (``_session.py``).
_current: ContextVar[ExecutionContext | None] = ContextVar("pygpukit_context", default=None)


class ContextState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class ContextUsage:
    """A snapshot of a context's memory and activity.

    :ivar used: bytes in live arrays allocated in the context's sessions
    :ivar held: device bytes the context's pool holds (``used`` plus cached free blocks);
        this is what its budget is charged
    :ivar peak: the largest ``held`` so far
    :ivar max: the budget, ``max_vram``
    :ivar base: ``base_vram`` (Burstable), else 0
    :ivar reserved: bytes reserved for the context on the device
    :ivar available: bytes the context could still get now
    :ivar sessions: sessions entered so far
    :ivar tasks: ``submit`` calls finished (``failed`` of them raised)
    :ivar queued: tasks waiting to launch now
    :ivar in_flight: tasks launched whose GPU work has not finished
    :ivar gpu_time_s: GPU time of finished tasks, measured with events on the stream
    :ivar cancelled: tasks taken out of the queue before they launched (their caller was
        cancelled, or the context destroyed)
    :ivar expired: tasks whose deadline passed before they could launch
    :ivar queue_full: ``submit`` calls refused with :class:`~pygpukit.QueueFull`
    :ivar evictions: buffers spilled to host memory (to make room for another context,
        or by :meth:`ExecutionContext.evict`)
    :ivar evicted_bytes: the bytes those spills freed on the device
    :ivar restores: spilled buffers brought back
    :ivar refusals: allocations refused with :class:`~pygpukit.VRAMBudgetExceeded`
    """

    name: str
    used: int
    held: int
    peak: int
    max: int
    base: int
    reserved: int
    available: int
    sessions: int
    tasks: int = 0
    failed: int = 0
    queued: int = 0
    in_flight: int = 0
    gpu_time_s: float = 0.0
    cancelled: int = 0
    expired: int = 0
    queue_full: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    restores: int = 0
    refusals: int = 0


class _Stats:
    """A context's task counters and histograms (``_stats.py`` says why without a lock)."""

    __slots__ = (
        "cancelled",
        "expired",
        "failed",
        "gpu_ms",
        "gpu_s",
        "queue_full",
        "queue_wait",
        "sessions",
        "submitted",
        "tasks",
    )

    def __init__(self) -> None:
        self.sessions = 0
        self.submitted = 0
        self.tasks = 0
        self.failed = 0
        self.cancelled = 0
        self.expired = 0
        self.queue_full = 0
        self.gpu_ms = 0.0
        self.queue_wait = Histogram()  # seconds from submit to launch
        self.gpu_s = Histogram()  # seconds of GPU time per finished task

    def record_task(self, gpu_ms: float, queue_wait_s: float | None, *, failed: bool) -> None:
        self.tasks += 1
        self.failed += failed
        self.gpu_ms += gpu_ms
        self.gpu_s.observe(gpu_ms / 1e3)
        if queue_wait_s is not None:
            self.queue_wait.observe(queue_wait_s)


class Owner(Protocol):
    """What a context needs of the runtime that made it."""

    backend: Backend
    device: DeviceInfo
    ledger: Ledger

    def destroy_context(self, ctx: ExecutionContext) -> None: ...


Submit = Callable[
    ["ExecutionContext", Callable[..., Any], tuple[Any, ...], dict[str, Any], int, float | None],
    Awaitable[Any],
]


class ExecutionContext:
    """An isolated place for one model to run: a stream, a VRAM budget, a QoS tier.

    Made by :meth:`Runtime.create_context` (or ``create_context``); enter it with
    ``context_session(ctx)``.
    """

    __slots__ = (
        "__weakref__",
        "_account",
        "_counts",
        "_eviction",
        "_pool",
        "_runtime",
        "_stats",
        "_submit",
        "name",
        "partition",
        "qos",
        "state",
        "stream",
    )
    _account: Account
    _counts: Callable[[ExecutionContext], tuple[int, int]]
    _eviction: Eviction
    _pool: RawPool
    _runtime: Owner
    _stats: _Stats
    _submit: Submit
    name: str
    partition: str | None
    qos: QoSPolicy
    state: ContextState
    stream: Stream

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "ExecutionContext objects cannot be instantiated directly; use "
            "create_context(name, max_vram=...) or Runtime.create_context()"
        )

    @classmethod
    def _make(
        cls,
        runtime: Owner,
        stream: Stream,
        account: Account,
        pool: RawPool,
        partition: str | None,
        submit: Submit,
        counts: Callable[[ExecutionContext], tuple[int, int]],
    ) -> ExecutionContext:
        """A context over an opened ledger account (its name, tier and budget)."""
        assert account.name is not None
        assert account.tier is not None
        self = object.__new__(cls)
        self.partition = partition
        self._runtime = runtime
        self.name = account.name
        self.qos = account.tier
        self.stream = stream
        self._account = account
        self._pool = pool
        self._stats = _Stats()
        self._submit = submit
        self._counts = counts
        self._eviction = Eviction(
            self.name, self.qos, runtime.backend, stream, pool, self._activated
        )
        self.state = ContextState.OPEN
        account.owner = self
        account.trim = pool.release_cached
        account.reclaim = self._eviction.reclaim
        return self

    @contextlib.contextmanager
    def _activated(self) -> Iterator[None]:
        """This context current and its stream bound, on the calling thread."""
        token = _current.set(self)
        try:
            backend = self._runtime.backend
            bound = backend.bind_stream(self.stream.raw)
            try:
                yield
            finally:
                backend.restore_stream(bound)
        finally:
            _current.reset(token)

    @property
    def max_vram(self) -> int:
        """The most device memory the context may hold."""
        return self._account.max_vram

    @property
    def base_vram(self) -> int:
        """The reserved part of a Burstable context's budget (0 for other tiers)."""
        return self._account.base_vram

    @property
    def device_id(self) -> int:
        return self._runtime.device.device_id

    @property
    def runtime(self) -> Owner:
        """The :class:`~pygpukit.runtime.Runtime` that made this context."""
        return self._runtime

    def _check_open(self) -> None:
        if self.state is ContextState.CLOSED:
            raise ContextClosed(self.name)

    def usage(self) -> ContextUsage:
        """Memory and activity now (see :class:`ContextUsage`)."""
        ledger = self._runtime.ledger
        a = self._account
        held, peak, reserved, max_vram, base_vram, closed = a.state()  # one snapshot
        queued, in_flight = self._counts(self)
        return ContextUsage(
            name=self.name,
            used=self._pool.used_bytes(),
            held=held,
            peak=peak,
            max=max_vram,
            base=base_vram,
            reserved=reserved,
            available=0 if closed else ledger.available(a),
            sessions=self._stats.sessions,
            tasks=self._stats.tasks,
            failed=self._stats.failed,
            queued=queued,
            in_flight=in_flight,
            gpu_time_s=self._stats.gpu_ms / 1e3,
            cancelled=self._stats.cancelled,
            expired=self._stats.expired,
            queue_full=self._stats.queue_full,
            evictions=self._eviction.evictions,
            evicted_bytes=self._eviction.evicted_bytes,
            restores=self._eviction.restores,
            refusals=a.refusals,
        )

    def task_histograms(self) -> tuple[Histogram, Histogram]:
        """The live histograms of this context's finished tasks, in seconds: how long each
        waited from ``submit`` to launch, and its GPU time (for metrics: read, never write)."""
        return self._stats.queue_wait, self._stats.gpu_s

    def record_event(self) -> Event:
        """An event at the current end of this context's stream."""
        self._check_open()
        return self.stream.record()

    def wait_event(self, event: Event) -> None:
        """Make this context's later work wait for ``event`` (recorded anywhere)."""
        self._check_open()
        self.stream.wait_event(event)

    async def synchronize(self) -> None:
        """Return once the work enqueued on this context's stream so far has run."""
        self._check_open()
        await self.stream

    async def submit(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        priority: int = 0,
        deadline: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` on this context's launcher thread; return its result
        once the GPU work it enqueued has run.

        The task is queued by tier, then ``priority`` (lower first), then arrival, and
        launched when the tier's and the context's in-flight caps allow. The loop stays
        free meanwhile. Cancelling before launch removes the task; after launch, the
        caller stops waiting and the task finishes on its own.

        :param deadline: a time on the runtime's policy clock (``time.monotonic()`` by
            default) by which the task must launch
        :raises QueueFull: too many tasks of this context are waiting
        :raises DeadlineExceeded: it could not launch in time (and did not run)
        :raises ContextClosed: the context was destroyed
        """
        return await self._submit(self, fn, args, kwargs, priority, deadline)

    def evictable(self, array: Any) -> Evictable | EvictableModule:
        """Hand ``array`` (allocated in this context) — or a ``torch.nn.Module`` whose
        parameters and buffers are on this context's device — to the runtime as spillable.

        Under pressure from a higher tier its bytes are copied to host memory and its device
        memory freed; the context's next session or task copies them back. Drop your own
        references to it and read it through the returned handle's ``.array``: a buffer
        referenced elsewhere cannot be evicted. The runtime holds the handle weakly: dropping
        the last reference to it frees the buffer.

        A module's handle evicts and restores its parameters and buffers in place (the
        module object and its ``Parameter`` objects stay the same); keep calling the module
        itself inside the context's sessions and tasks, which restore it first.

        :raises InvalidArgument: a Guaranteed context (never evicted), or a module with
            tensors off this device
        :raises InvalidArgumentType: neither an array nor a module
        """
        self._check_open()
        return self._eviction.add(array)

    def evict(self, nbytes: int | None = None) -> int:
        """Spill this context's evictable buffers and modules (:meth:`evictable`) to host
        memory now, least recently used first, until ``nbytes`` are freed on the device
        (all of them with ``None``); its next session or task brings them back. For a
        caller that knows what it will need next — a model server paging out the models it
        has not used lately before loading another.

        :returns: the bytes freed: 0 while a session or task of the context runs (nothing
            is evicted from under running work) or when nothing is resident
        :raises InvalidArgument: ``nbytes`` is not positive
        """
        self._check_open()
        want = sys.maxsize if nbytes is None else check_bytes(nbytes, "nbytes")
        return self._eviction.reclaim(want)

    def close(self) -> None:
        """Destroy the context (same as ``destroy_context``); idempotent."""
        self._runtime.destroy_context(self)

    def __repr__(self) -> str:
        return (
            f"<ExecutionContext {self.name!r} qos={self.qos.name} "
            f"max_vram={_fmt_bytes(self.max_vram)} held={_fmt_bytes(self._account.held)} "
            f"priority={self.stream.priority} state={self.state.value}>"
        )
