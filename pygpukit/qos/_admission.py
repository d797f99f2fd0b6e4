"""QoS admission: whether a task may start, and what it reserves while it runs (DESIGN §6).

:class:`QosPolicyEvaluator` holds the device's reservations. Guaranteed tasks reserve their
memory and bandwidth; Burstable tasks reserve their base and burst into whatever is left
unreserved; BestEffort tasks reserve nothing and only start when spare memory is there.
The sum of reservations never exceeds the device's totals.
"""

from __future__ import annotations

import enum
import math
import threading
from dataclasses import dataclass

from .._exceptions import InvalidArgument, _fmt_bytes
from ..runtime._tiers import QoSPolicy

__all__ = ("AdmissionAction", "QosEvaluation", "QosPolicyEvaluator", "QosTaskMeta")

#: Dispatch rank per tier: lower runs first, as with CUDA stream priorities.
_PRIORITY = {QoSPolicy.GUARANTEED: 0, QoSPolicy.BURSTABLE: 1, QoSPolicy.BEST_EFFORT: 2}


class AdmissionAction(enum.Enum):
    """What the caller should do with a task after evaluation."""

    ADMIT = "admit"  #: start it
    THROTTLE = "throttle"  #: start it, but limit its bursts to what is unreserved
    QUEUE = "queue"  #: not now; try again after a release
    REJECT = "reject"  #: it cannot be granted as asked


def _check_id(value: object, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty str, got {value!r}; pass a name")


def _check_bytes(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(
            f"{what} must be an int number of bytes >= 0, got {value!r}; pass e.g. 256 * MB"
        )


def _check_fraction(value: object, what: str) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok:
        raise InvalidArgument(
            f"{what} must be a fraction of the device between 0.0 and 1.0, got {value!r}"
        )


@dataclass(frozen=True)
class QosTaskMeta:
    """What a task asks for. Build one with :meth:`guaranteed`, :meth:`burstable` or
    :meth:`best_effort`.

    :ivar memory: bytes reserved (Guaranteed), the reserved base (Burstable), or the bytes
        it will use from spare capacity (BestEffort)
    :ivar burst_memory: Burstable only: extra bytes it may use beyond its base when spare
    :ivar bandwidth: fraction of the device's bandwidth reserved (0.0 to 1.0)
    :raises InvalidArgument: a field breaks its rule
    """

    id: str
    name: str
    tier: QoSPolicy
    memory: int
    burst_memory: int = 0
    bandwidth: float = 0.0

    def __post_init__(self) -> None:
        _check_id(self.id, "task id")
        _check_id(self.name, "task name")
        if not isinstance(self.tier, QoSPolicy):
            raise InvalidArgument(f"tier must be a QoSPolicy, got {self.tier!r}")
        _check_bytes(self.memory, "memory")
        _check_bytes(self.burst_memory, "burst_memory")
        if self.burst_memory and self.tier is not QoSPolicy.BURSTABLE:
            raise InvalidArgument(
                f"burst_memory is only for Burstable tasks, got {self.burst_memory!r} on a "
                f"{self.tier.value} task; use QosTaskMeta.burstable()"
            )
        _check_fraction(self.bandwidth, "bandwidth")

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
    """The decision on one task.

    :ivar admitted: whether the task may start now (``True`` for ADMIT and THROTTLE)
    :ivar priority: dispatch rank of its tier: 0 Guaranteed, 1 Burstable, 2 BestEffort;
        lower runs first, like CUDA stream priorities. Set whatever the decision.
    :ivar reason: a sentence saying why
    :ivar reserved_memory: bytes admitting it reserves (0 when not admitted or BestEffort)
    :ivar reserved_bandwidth: bandwidth admitting it reserves (same rule)
    """

    admitted: bool
    action: AdmissionAction
    priority: int
    reason: str
    reserved_memory: int
    reserved_bandwidth: float


class QosPolicyEvaluator:
    """Admission control against a device's memory and bandwidth. Thread-safe.

    BestEffort tasks reserve nothing, so Guaranteed and Burstable admission ignores the
    memory they use: under pressure they are the ones evicted (DESIGN §6).

    :param total_memory: device bytes that can be reserved
    :param total_bandwidth: bandwidth that can be reserved (1.0 = the whole device)
    :raises InvalidArgument: a total breaks its rule
    """

    def __init__(self, total_memory: int, total_bandwidth: float = 1.0) -> None:
        if isinstance(total_memory, bool) or not isinstance(total_memory, int) or total_memory <= 0:
            raise InvalidArgument(
                f"total_memory must be an int number of bytes > 0, got {total_memory!r}"
            )
        if (
            isinstance(total_bandwidth, bool)
            or not isinstance(total_bandwidth, int | float)
            or not 0.0 < total_bandwidth < math.inf
        ):
            raise InvalidArgument(
                f"total_bandwidth must be a finite number > 0 (1.0 = the whole device), "
                f"got {total_bandwidth!r}"
            )
        self.total_memory = total_memory
        self.total_bandwidth = float(total_bandwidth)
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
        if not isinstance(task, QosTaskMeta):
            raise InvalidArgument(
                f"expected a QosTaskMeta, got {task!r}; build one with "
                "QosTaskMeta.guaranteed/burstable/best_effort()"
            )
        prio = _PRIORITY[task.tier]

        def no(action: AdmissionAction, reason: str) -> QosEvaluation:
            return QosEvaluation(False, action, prio, reason, 0, 0.0)

        if task.id in self._tasks:
            return no(
                AdmissionAction.REJECT,
                f"task id {task.id!r} is already admitted; "
                f"release({task.id!r}) it first or use a unique id",
            )
        total, free = self.total_memory, self.total_memory - self._reserved_memory
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
                )
            return no(
                AdmissionAction.QUEUE,
                f"needs {_fmt_bytes(task.memory)} of spare memory but only "
                f"{_fmt_bytes(max(spare, 0))} is spare ({_fmt_bytes(free)} unreserved, "
                f"{_fmt_bytes(self._best_effort_memory)} in use by best-effort tasks); "
                "try again after a release",
            )
        what = "reserved" if task.tier is QoSPolicy.GUARANTEED else "reserved as its base"
        free_bw = self.total_bandwidth - self._reserved_bandwidth
        missing = []
        if task.memory > free:
            missing.append(
                f"{_fmt_bytes(task.memory)} {what} but only {_fmt_bytes(free)} "
                f"of {_fmt_bytes(total)} is unreserved"
            )
        if self._bandwidth_sum(task.bandwidth) > self.total_bandwidth:
            missing.append(
                f"bandwidth {task.bandwidth:g} {what} but only {max(free_bw, 0):g} "
                f"of {self.total_bandwidth:g} is unreserved"
            )
        if missing:
            return no(
                AdmissionAction.REJECT,
                "needs " + " and ".join(missing) + "; release other reservations or ask for less",
            )
        action, reason = (
            AdmissionAction.ADMIT,
            (f"{_fmt_bytes(task.memory)} and bandwidth {task.bandwidth:g} {what}"),
        )
        if task.tier is QoSPolicy.BURSTABLE and task.memory + task.burst_memory > free:
            action = AdmissionAction.THROTTLE
            reason += (
                f"; its burst to {_fmt_bytes(task.memory + task.burst_memory)} exceeds "
                f"the {_fmt_bytes(free)} unreserved, so its bursts will be throttled"
            )
        return QosEvaluation(True, action, prio, reason, task.memory, float(task.bandwidth))

    def evaluate(self, task: QosTaskMeta) -> QosEvaluation:
        """Decide on ``task`` against the current reservations, reserving nothing.

        :raises InvalidArgument: ``task`` is not a :class:`QosTaskMeta`
        """
        with self._lock:
            return self._evaluate(task)

    def admit(self, task: QosTaskMeta) -> QosEvaluation:
        """Decide on ``task`` and, if admitted, record it until :meth:`release`. Atomic.

        :raises InvalidArgument: ``task`` is not a :class:`QosTaskMeta`
        """
        with self._lock:
            result = self._evaluate(task)
            if result.admitted:
                self._tasks[task.id] = task
                if task.tier is QoSPolicy.BEST_EFFORT:
                    self._best_effort_memory += task.memory
                else:
                    self._reserved_memory += task.memory
                    self._reserved_bandwidth = self._bandwidth_sum()
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
