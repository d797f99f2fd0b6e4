"""QoS admission: whether a task may start, and what it reserves while it runs (DESIGN §6).

:class:`QosPolicyEvaluator` holds the device's reservations. Guaranteed tasks reserve their
memory and bandwidth; Burstable tasks reserve their base and burst into whatever is left
unreserved; BestEffort tasks reserve nothing and only start when spare memory is there.
The sum of reservations never exceeds the device's totals.

Deciding and committing are two steps, as in the project the seed describes:
:meth:`~QosPolicyEvaluator.evaluate` decides and **reserves nothing**;
:meth:`~QosPolicyEvaluator.reserve` commits an evaluation, checking it again against the
reservations made since (a stale evaluation is refused, never over-committed);
:meth:`~QosPolicyEvaluator.admit` does both at once. The memory rule is the runtime's
:func:`~pygpukit.runtime.check_reservation`, the same one the ledger applies to contexts.
"""

from __future__ import annotations

import enum
import math
import threading
from dataclasses import dataclass

from .._exceptions import AdmissionRejected, InvalidArgument, _fmt_bytes
from ..runtime import QoSPolicy, check_reservation
from ..runtime.checks import check_bytes, check_instance, check_name, check_number

__all__ = ("AdmissionAction", "QosEvaluation", "QosPolicyEvaluator", "QosTaskMeta")

#: Dispatch rank per tier: lower runs first, as with CUDA stream priorities.
_PRIORITY = {QoSPolicy.GUARANTEED: 0, QoSPolicy.BURSTABLE: 1, QoSPolicy.BEST_EFFORT: 2}

_BUILD_TASK = "build one with QosTaskMeta.guaranteed/burstable/best_effort()"


class AdmissionAction(enum.Enum):
    """What the caller should do with a task after evaluation."""

    ADMIT = "admit"  #: start it
    THROTTLE = "throttle"  #: start it, but limit its bursts to what is unreserved
    QUEUE = "queue"  #: not now; try again after a release
    REJECT = "reject"  #: it cannot be granted as asked


@dataclass(frozen=True)
class QosTaskMeta:
    """What a task asks for. Build one with :meth:`guaranteed`, :meth:`burstable` or
    :meth:`best_effort`.

    :ivar memory: bytes reserved (Guaranteed), the reserved base (Burstable), or the bytes
        it will use from spare capacity (BestEffort)
    :ivar burst_memory: Burstable only: extra bytes it may use beyond its base when spare
    :ivar bandwidth: fraction of the device's bandwidth reserved (0.0 to 1.0)
    :raises InvalidArgumentType: a field has the wrong type
    :raises InvalidArgument: a field's value breaks its rule
    """

    id: str
    name: str
    tier: QoSPolicy
    memory: int
    burst_memory: int = 0
    bandwidth: float = 0.0

    def __post_init__(self) -> None:
        check_name(self.id, "task id")
        check_name(self.name, "task name")
        check_instance(self.tier, QoSPolicy, "tier", "pass e.g. QoSPolicy.GUARANTEED")
        # frozen: store the checked values in their canonical types (np.int64 -> int)
        object.__setattr__(self, "memory", check_bytes(self.memory, "memory", allow_zero=True))
        burst = check_bytes(self.burst_memory, "burst_memory", allow_zero=True)
        object.__setattr__(self, "burst_memory", burst)
        if self.burst_memory and self.tier is not QoSPolicy.BURSTABLE:
            raise InvalidArgument(
                f"burst_memory is only for Burstable tasks, got {self.burst_memory!r} on a "
                f"{self.tier.value} task; use QosTaskMeta.burstable()"
            )
        bandwidth = check_number(
            self.bandwidth, "bandwidth", low=0.0, high=1.0, hint="a fraction of the device"
        )
        object.__setattr__(self, "bandwidth", bandwidth)

    @classmethod
    def guaranteed(cls, id: str, name: str, memory: int, bandwidth: float = 0.0) -> QosTaskMeta:
        """A task whose ``memory`` and ``bandwidth`` are reserved for its whole life."""
        return cls(id, name, QoSPolicy.GUARANTEED, memory, 0, bandwidth)

    @classmethod
    def burstable(
        cls, id: str, name: str, memory: int, burst_memory: int = 0, bandwidth: float = 0.0
    ) -> QosTaskMeta:
        """A task with ``memory`` reserved as its base and ``burst_memory`` more from spare."""
        return cls(id, name, QoSPolicy.BURSTABLE, memory, burst_memory, bandwidth)

    @classmethod
    def best_effort(cls, id: str, name: str, memory: int, bandwidth: float = 0.0) -> QosTaskMeta:
        """A task that reserves nothing and runs on spare capacity (``bandwidth`` is a hint)."""
        return cls(id, name, QoSPolicy.BEST_EFFORT, memory, 0, bandwidth)


@dataclass(frozen=True)
class QosEvaluation:
    """The decision on one task. Evaluating reserves nothing: pass an admitted evaluation
    to :meth:`QosPolicyEvaluator.reserve` to commit it.

    :ivar admitted: whether the task may start now (``True`` for ADMIT and THROTTLE)
    :ivar priority: dispatch rank of its tier: 0 Guaranteed, 1 Burstable, 2 BestEffort;
        lower runs first, like CUDA stream priorities. Set whatever the decision.
    :ivar reason: a sentence saying why
    :ivar reserved_memory: bytes committing it reserves (0 when not admitted or BestEffort)
    :ivar reserved_bandwidth: bandwidth committing it reserves (same rule)
    :ivar task: the task decided on (what :meth:`QosPolicyEvaluator.reserve` commits)
    """

    admitted: bool
    action: AdmissionAction
    priority: int
    reason: str
    reserved_memory: int
    reserved_bandwidth: float
    task: QosTaskMeta


class QosPolicyEvaluator:
    """Admission control against a device's memory and bandwidth. Thread-safe.

    :meth:`evaluate` only decides; :meth:`reserve` commits a decision (re-checking it);
    :meth:`admit` decides and commits atomically; :meth:`release` gives a commitment back.

    BestEffort tasks reserve nothing, so Guaranteed and Burstable admission ignores the
    memory they use: under pressure they are the ones evicted (DESIGN §6).

    :param total_memory: device bytes that can be reserved (any integer type)
    :param total_bandwidth: bandwidth that can be reserved (1.0 = the whole device)
    :raises InvalidArgumentType: a total is not a number
    :raises InvalidArgument: a total is not > 0
    """

    def __init__(self, total_memory: int, total_bandwidth: float = 1.0) -> None:
        self.total_memory = check_bytes(total_memory, "total_memory")
        self.total_bandwidth = check_number(
            total_bandwidth,
            "total_bandwidth",
            low=0.0,
            low_open=True,
            hint="1.0 = the whole device",
        )
        self._lock = threading.Lock()
        self._tasks: dict[str, QosTaskMeta] = {}
        self._reserved_memory = 0
        self._reserved_bandwidth = 0.0
        self._best_effort_memory = 0

    def _bandwidth_sum(self, extra: float = 0.0) -> float:
        # fsum over the live reservations, never a running total: no float drift, and an
        # empty evaluator reads exactly 0.0.
        parts = [t.bandwidth for t in self._tasks.values() if t.tier is not QoSPolicy.BEST_EFFORT]
        return math.fsum([*parts, extra])

    def _evaluate(self, task: QosTaskMeta) -> QosEvaluation:
        # Callers hold the lock.
        check_instance(task, QosTaskMeta, "the task", _BUILD_TASK)
        prio = _PRIORITY[task.tier]

        def no(action: AdmissionAction, reason: str) -> QosEvaluation:
            return QosEvaluation(False, action, prio, reason, 0, 0.0, task)

        if task.id in self._tasks:
            return no(
                AdmissionAction.REJECT,
                f"task id {task.id!r} is already admitted; "
                f"release({task.id!r}) it first or use a unique id",
            )
        free = self.total_memory - self._reserved_memory
        if task.tier is QoSPolicy.BEST_EFFORT:
            spare = free - self._best_effort_memory
            if task.memory <= spare:
                return QosEvaluation(
                    True,
                    AdmissionAction.ADMIT,
                    prio,
                    f"uses {_fmt_bytes(task.memory)} of the "
                    f"{_fmt_bytes(spare)} spare; nothing reserved",
                    0,
                    0.0,
                    task,
                )
            return no(
                AdmissionAction.QUEUE,
                f"needs {_fmt_bytes(task.memory)} of spare memory but only "
                f"{_fmt_bytes(max(spare, 0))} is spare ({_fmt_bytes(free)} unreserved, "
                f"{_fmt_bytes(self._best_effort_memory)} in use by best-effort tasks); "
                "try again after a release",
            )
        memory = check_reservation(
            task.memory, free, self.total_memory, tier=task.tier, knob="memory"
        )
        free_bw = max(self.total_bandwidth - self._reserved_bandwidth, 0.0)
        # fsum of the reservations, not `bandwidth <= free_bw`: 0.7 + 0.3 fits 1.0
        bandwidth_fits = self._bandwidth_sum(task.bandwidth) <= self.total_bandwidth
        if not memory.fits:
            reason = memory.reason
            if not bandwidth_fits:
                reason += (
                    f"; its bandwidth {task.bandwidth:g} does not fit the {free_bw:g} of "
                    f"{self.total_bandwidth:g} unreserved either"
                )
            return no(AdmissionAction.REJECT, reason)
        if not bandwidth_fits:
            return no(
                AdmissionAction.REJECT,
                f"it must reserve bandwidth {task.bandwidth:g} ({task.tier.name}) but only "
                f"{free_bw:g} of {self.total_bandwidth:g} is unreserved; lower its bandwidth, "
                "use a lower tier, or release reservations held by others",
            )
        action = AdmissionAction.ADMIT
        reason = f"{memory.reason}, and bandwidth {task.bandwidth:g} of the {free_bw:g} unreserved"
        if task.tier is QoSPolicy.BURSTABLE and task.memory + task.burst_memory > free:
            action = AdmissionAction.THROTTLE
            reason += (
                f"; its burst to {_fmt_bytes(task.memory + task.burst_memory)} exceeds "
                f"the {_fmt_bytes(free)} unreserved, so its bursts will be throttled"
            )
        return QosEvaluation(True, action, prio, reason, task.memory, task.bandwidth, task)

    def _commit(self, task: QosTaskMeta) -> None:
        # Callers hold the lock and have just evaluated ``task`` as admitted.
        self._tasks[task.id] = task
        if task.tier is QoSPolicy.BEST_EFFORT:
            self._best_effort_memory += task.memory
        else:
            self._reserved_memory += task.memory
            self._reserved_bandwidth = self._bandwidth_sum()

    def evaluate(self, task: QosTaskMeta) -> QosEvaluation:
        """Decide on ``task`` against the current reservations. **Reserves nothing**: the
        decision holds only until someone else reserves; commit it with :meth:`reserve`, or
        use :meth:`admit` to decide and commit at once.

        :raises InvalidArgumentType: ``task`` is not a :class:`QosTaskMeta`
        """
        with self._lock:
            return self._evaluate(task)

    def reserve(self, result: QosEvaluation) -> QosEvaluation:
        """Commit an admitted evaluation: record its task until :meth:`release`.

        The task is evaluated again, atomically, against the reservations as they are now,
        so an evaluation made stale by reservations committed since it was made is refused
        instead of over-committing the device.

        :param result: what :meth:`evaluate` returned, with ``admitted`` true
        :returns: the evaluation the commitment was made on (its action may differ from
            ``result``'s, e.g. THROTTLE where the burst room has shrunk since)
        :raises AdmissionRejected: the task no longer fits (or is committed already);
            nothing was reserved
        :raises InvalidArgument: ``result`` did not admit its task
        :raises InvalidArgumentType: ``result`` is not a :class:`QosEvaluation`
        """
        check_instance(
            result, QosEvaluation, "reserve()'s argument", "pass what evaluate() returned"
        )
        task = result.task
        if not result.admitted:
            raise InvalidArgument(
                f"reserve() commits admitted evaluations only, and task {task.id!r} was not "
                f"admitted ({result.reason}); evaluate() it again later, or call admit()"
            )
        with self._lock:
            now = self._evaluate(task)
            if not now.admitted:
                raise AdmissionRejected(f"task {task.id!r} (its evaluation is stale)", now.reason)
            self._commit(task)
            return now

    def admit(self, task: QosTaskMeta) -> QosEvaluation:
        """Decide on ``task`` and, if admitted, record it until :meth:`release`. Atomic:
        :meth:`evaluate` and :meth:`reserve` in one step, with nothing between them.

        :raises InvalidArgumentType: ``task`` is not a :class:`QosTaskMeta`
        """
        with self._lock:
            result = self._evaluate(task)
            if result.admitted:
                self._commit(task)
            return result

    def release(self, task_id: str) -> None:
        """Drop an admitted task's reservation (or its best-effort memory).

        :raises InvalidArgument: no admitted task has ``task_id`` (never admitted, or
            released already: a double release is a bug, not a no-op)
        """
        with self._lock:
            task = self._tasks.pop(task_id, None)
            if task is None:
                raise InvalidArgument(
                    f"no admitted task has id {task_id!r}; release() each admitted task "
                    "exactly once"
                )
            if task.tier is QoSPolicy.BEST_EFFORT:
                self._best_effort_memory -= task.memory
            else:
                self._reserved_memory -= task.memory
                self._reserved_bandwidth = self._bandwidth_sum()

    @property
    def reserved_memory(self) -> int:
        """Bytes reserved by admitted Guaranteed tasks and Burstable bases."""
        return self._reserved_memory

    @property
    def reserved_bandwidth(self) -> float:
        """Bandwidth reserved by admitted Guaranteed and Burstable tasks."""
        return self._reserved_bandwidth

    @property
    def available_memory(self) -> int:
        """Bytes not reserved (best-effort use is not subtracted: it can be evicted)."""
        return self.total_memory - self._reserved_memory

    @property
    def available_bandwidth(self) -> float:
        """Bandwidth not reserved."""
        return self.total_bandwidth - self._reserved_bandwidth

    @property
    def best_effort_memory(self) -> int:
        """Bytes in use by admitted BestEffort tasks."""
        return self._best_effort_memory

    def admitted_ids(self) -> tuple[str, ...]:
        """Ids of the admitted tasks, in admission order."""
        with self._lock:
            return tuple(self._tasks)

    def __repr__(self) -> str:
        with self._lock:
            return (
                f"<QosPolicyEvaluator reserved={_fmt_bytes(self._reserved_memory)}/"
                f"{_fmt_bytes(self.total_memory)} bandwidth={self._reserved_bandwidth:g}/"
                f"{self.total_bandwidth:g} best_effort={_fmt_bytes(self._best_effort_memory)} "
                f"tasks={len(self._tasks)}>"
            )
