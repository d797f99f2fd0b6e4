"""The runtime's default scheduling policy: the per-tier queue behind ``ctx.submit``.

Tasks wait in one priority queue ordered by tier (Guaranteed, Burstable, BestEffort), then
task priority (lower runs first, like CUDA stream priorities), then arrival. A task is
*launched* — handed to its context's launcher thread, which runs ``fn`` with the context's
stream and budget bound — when its tier and its context are under their in-flight caps
(BestEffort's is small by default) and, in strict mode, when no Guaranteed task is in
flight if it is BestEffort. It stays in flight until the GPU work ``fn`` enqueued has run;
then its caller gets ``fn``'s result. A task whose deadline passes before it can launch fails
with :class:`~pygpukit.DeadlineExceeded` and never runs.

Time is read only through the clock the dispatcher is given, so tests can drive it.
The dispatcher implements :class:`~pygpukit.runtime.SchedulingPolicy`.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._exceptions import DeadlineExceeded, InvalidArgument, InvalidArgumentType, QueueFull
from ._tasks import Task, TaskState
from ._tiers import QoSPolicy

__all__ = ("Dispatcher", "DispatcherConfig")


@dataclass(frozen=True)
class DispatcherConfig:
    """Caps and bounds. ``None`` means unlimited.

    :ivar tier_in_flight: tasks of a tier in flight at once
    :ivar context_in_flight: tasks of one context in flight at once (16): how far a
        context's launched work may run ahead of the dispatcher's order. A task queued
        later with a lower priority number waits for at most this many of its context's
        tasks already launched; tasks launched back to back share completion signals
        only this many at a time (``LauncherConfig.batch_us``; docs/adr/0035)
    :ivar max_queued: tasks of one context waiting to launch; more raise QueueFull
    :ivar strict: hold BestEffort launches while any Guaranteed task is in flight
    """

    tier_in_flight: Mapping[QoSPolicy, int | None] = field(
        default_factory=lambda: {
            QoSPolicy.GUARANTEED: None,
            QoSPolicy.BURSTABLE: None,
            QoSPolicy.BEST_EFFORT: 2,
        }
    )
    context_in_flight: int | None = 16
    max_queued: int | None = 1024
    strict: bool = False


class Dispatcher:
    """Orders and launches tasks; thread-safe, loop-agnostic. One per runtime.

    :param config: caps and bounds
    :param clock: the only source of time (``time.monotonic`` by default)
    """

    def __init__(
        self,
        config: DispatcherConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config is not None and not isinstance(config, DispatcherConfig):
            raise InvalidArgumentType(
                f"Dispatcher() takes a DispatcherConfig, not {type(config).__name__}"
            )
        self.config = config or DispatcherConfig()
        self._over_share: Callable[[Task], bool] | None = None
        self.clock = clock
        self._launch: Callable[[Task], None] = _unbound
        self._lock = threading.Lock()
        # One heap per context: everything that decides whether a task may launch (its
        # tier's and its context's caps, its partition's share, strict mode) is the same
        # for every task of a context, so a context whose first task is held back is held
        # back entirely and a pass looks at one task per context, not at the whole queue.
        self._queues: dict[Any, list[tuple[tuple[int, int, int], Task]]] = {}
        self._seq = itertools.count(1)
        self.in_flight_tier: Counter[QoSPolicy] = Counter()
        self.in_flight_ctx: Counter[Any] = Counter()
        self.queued_ctx: Counter[Any] = Counter()
        self._gone: set[Any] = set()  # destroyed contexts with tasks still in flight

    def bind(
        self, launch: Callable[[Task], None], over_share: Callable[[Task], bool] | None
    ) -> None:
        """Called once by the runtime: ``launch(task)`` hands a task to its context's
        launcher (never blocks); ``over_share(task)`` tells whether the task's partition is
        over its compute share."""
        if self._launch is not _unbound:
            raise InvalidArgument(
                "this Dispatcher already schedules another runtime's tasks; give each "
                "Runtime a Dispatcher of its own"
            )
        self._launch = launch
        self._over_share = over_share

    # -- queue ------------------------------------------------------------------------
    def enqueue(self, task: Task) -> None:
        """Queue ``task`` and launch what can run.

        :raises QueueFull: its context already has ``max_queued`` tasks waiting
        """
        limit = self.config.max_queued
        with self._lock:
            if limit is not None and self.queued_ctx[task.context] >= limit:
                raise QueueFull(
                    f"context {getattr(task.context, 'name', task.context)!r} already has "
                    f"{limit} tasks waiting to launch; retry later, submit fewer at once, "
                    "or raise DispatcherConfig.max_queued"
                )
            task.seq = next(self._seq)
            task.t_queued = now = self.clock()
            self.queued_ctx[task.context] += 1
            # Nothing queued anywhere: if this task may run, no other can be ahead of it.
            direct = (
                not self._queues
                and (task.deadline is None or now <= task.deadline)
                and self._eligible(task, True, self._waiting_partitions)
            )
            # Its context has tasks waiting already: the last pass found that context
            # unable to launch (what decides that is the same for all its tasks, and only
            # a launch, a finish or a cancel changes it, each followed by a pass), so a
            # pass now could launch nothing. In a burst that is every submit but the first.
            behind = task.context in self._queues
            if direct:
                self._start(task, now)
            else:
                heapq.heappush(self._queues.setdefault(task.context, []), (task.key, task))
        if direct:
            self._launch(task)
        elif not behind:
            self.pump()

    def _waiting_partitions(self) -> set[Any]:
        return {getattr(ctx, "partition", None) for ctx in self._queues}

    def _start(self, task: Task, now: float) -> None:
        """Count ``task`` as launched (call with the lock held)."""
        task.state = TaskState.RUNNING
        task.t_launched = now
        self.queued_ctx[task.context] -= 1
        self.in_flight_tier[task.tier] += 1
        self.in_flight_ctx[task.context] += 1

    def cancel(self, task: Task) -> bool:
        """Take a queued task out; ``False`` if it already launched (or ended)."""
        if not self._take_out(task, TaskState.CANCELLED):
            return False
        self.pump()  # a cancelled head may have been holding nothing, but be exact
        return True

    def queued(self) -> list[Task]:
        """Waiting tasks in launch order."""
        with self._lock:
            live = [t for q in self._queues.values() for _, t in q if t.state is TaskState.QUEUED]
        return sorted(live, key=lambda t: t.key)

    # -- launching --------------------------------------------------------------------
    def _eligible(self, task: Task, shares: bool, waiting: Callable[[], set[Any]]) -> bool:
        # Held back only if its partition used more than its compute share of recent GPU
        # time while another partition has work waiting (contention). The waiting set is
        # built only when some task is over its share: dispatch without partitions pays
        # nothing for them.
        if shares and self._over_share is not None and self._over_share(task):
            if waiting() - {getattr(task.context, "partition", None)}:
                return False
        cap = self.config.tier_in_flight.get(task.tier)
        if cap is not None and self.in_flight_tier[task.tier] >= cap:
            return False
        ctx_cap = self.config.context_in_flight
        if ctx_cap is not None and self.in_flight_ctx[task.context] >= ctx_cap:
            return False
        return not (
            self.config.strict
            and task.tier is QoSPolicy.BEST_EFFORT
            and self.in_flight_tier[QoSPolicy.GUARANTEED] > 0
        )

    def pump(self) -> None:
        """Launch every queued task that may run now, in order; expire late ones.

        Partitions over their compute share are held back, unless nothing would run
        otherwise (the GPU is never left idle to honour a share).
        """
        if not self._queues:  # nothing waits (read without the lock: a task enqueued
            return  # meanwhile is pumped by its own enqueue)
        launch: list[Task] = []
        expired: list[Task] = []
        with self._lock:
            now = self.clock()
            self._pass(now, True, launch, expired)
            if not launch and not any(self.in_flight_tier.values()):
                self._pass(now, False, launch, expired)
        for task in expired:
            task.deliver(None, _expired(task, now))
        for task in launch:
            self._launch(task)

    def _pass(self, now: float, shares: bool, launch: list[Task], expired: list[Task]) -> None:
        """One merge over the contexts' queues in task order (call with the lock held)."""
        heads: list[tuple[tuple[int, int, int], Task]] = []
        for ctx, q in list(self._queues.items()):
            head = self._head(q, now, expired)
            if head is None:
                del self._queues[ctx]
            else:
                heads.append((head.key, head))
        heapq.heapify(heads)
        cache: list[set[Any]] = []

        def waiting() -> set[Any]:  # partitions with queued work
            if not cache:
                cache.append(self._waiting_partitions())
            return cache[0]

        while heads:
            task = heapq.heappop(heads)[1]
            if not self._eligible(task, shares, waiting):
                continue  # and so is the rest of its context's queue, this pass
            q = self._queues[task.context]
            heapq.heappop(q)
            self._start(task, now)
            launch.append(task)
            head = self._head(q, now, expired)
            if head is None:
                del self._queues[task.context]
            else:
                heapq.heappush(heads, (head.key, head))

    def _head(
        self, q: list[tuple[tuple[int, int, int], Task]], now: float, expired: list[Task]
    ) -> Task | None:
        """The first live task of one context's queue, dropping cancelled and late ones."""
        while q:
            task = q[0][1]
            if task.state is not TaskState.QUEUED:
                heapq.heappop(q)
            elif task.deadline is not None and now > task.deadline:
                heapq.heappop(q)
                task.state = TaskState.EXPIRED
                self.queued_ctx[task.context] -= 1
                expired.append(task)
            else:
                return task
        return None

    def _take_out(self, task: Task, state: TaskState) -> bool:
        """Mark a still-queued task ``state`` (it stays in its heap until popped, then is
        skipped); ``False`` if it launched or ended already."""
        with self._lock:
            if task.state is not TaskState.QUEUED:
                return False
            task.state = state
            self.queued_ctx[task.context] -= 1
            return True

    def expire(self, task: Task) -> bool:
        """Fail a still-queued task whose deadline passed; ``False`` if it launched."""
        if not self._take_out(task, TaskState.EXPIRED):
            return False
        task.deliver(None, _expired(task, self.clock()))
        return True

    def finished(self, task: Task, value: Any, exc: BaseException | None) -> None:
        """Called once the task's GPU work has run (or failed): free its place, deliver."""
        with self._lock:
            task.state = TaskState.FAILED if exc is not None else TaskState.DONE
            task.t_done = self.clock()
            self.in_flight_tier[task.tier] -= 1
            self.in_flight_ctx[task.context] -= 1
            if self._gone and task.context in self._gone and not self.in_flight_ctx[task.context]:
                self._drop(task.context)
        task.deliver(value, exc)
        self.pump()

    def in_flight(self) -> int:
        with self._lock:
            return sum(self.in_flight_tier.values())

    def counts(self, context: Any) -> tuple[int, int]:
        """``(queued, in flight)`` tasks of ``context``."""
        return self.queued_ctx[context], self.in_flight_ctx[context]

    def forget(self, context: Any) -> None:
        """Drop a destroyed context's counters (they would keep it alive), now or once its
        last task in flight finishes."""
        with self._lock:
            if self.in_flight_ctx[context]:
                self._gone.add(context)
            else:
                self._drop(context)

    def _drop(self, context: Any) -> None:
        self._gone.discard(context)
        del self.queued_ctx[context]  # Counter: no KeyError for a missing key
        del self.in_flight_ctx[context]


def _unbound(task: Task) -> None:
    raise RuntimeError("this Dispatcher is not bound to a runtime; pass it as Runtime(policy=)")


def _expired(task: Task, now: float) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"task {getattr(task.fn, '__qualname__', task.fn)!r} of context "
        f"{getattr(task.context, 'name', '?')!r}",
        late_s=now - (task.deadline or now),
    )
