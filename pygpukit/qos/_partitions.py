"""Partitions: groups of contexts under a memory limit and a compute share (DESIGN §6).

Memory limits are enforced by :meth:`PartitionManager.charge`, which the runtime's pools
call before they allocate. Compute shares are enforced by the dispatcher: it reports the
GPU time each partition used (:meth:`~PartitionManager.record_gpu_time`) and holds back a
partition that is :meth:`~PartitionManager.over_share` while another one wants the GPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from .._exceptions import (
    AdmissionRejected,
    BudgetReason,
    InvalidArgument,
    VRAMBudgetExceeded,
    _fmt_bytes,
)
from .._locks import BookkeepingLock
from ..runtime.checks import check_bytes, check_instance, check_name, check_number

__all__ = ("PartitionConfig", "PartitionInfo", "PartitionLimits", "PartitionManager")

#: Slack for float compute shares, so 0.7 + 0.3 fits a total of 1.0.
_EPS = 1e-9


def _check_share(value: object, what: str) -> float:
    return check_number(
        value, what, low=0.0, high=1.0, low_open=True, hint="a share of the device, e.g. 0.5"
    )


@dataclass(frozen=True)
class PartitionLimits:
    """A partition's limits, built fluently: ``PartitionLimits().memory(4 * GB).compute(0.5)``.

    Each builder method returns a new object. A limit left unset (``None``) defaults, when
    the partition is created, to what the other partitions left: all unallocated memory,
    all the remaining compute share.

    :raises InvalidArgumentType: memory is not an integer, or compute not a number
    :raises InvalidArgument: memory is not > 0, or compute is not in (0, 1]
    """

    memory_limit: int | None = None
    compute_limit: float | None = None

    def __post_init__(self) -> None:
        # frozen: store the checked values in their canonical types (np.int64 -> int)
        if self.memory_limit is not None:
            object.__setattr__(self, "memory_limit", check_bytes(self.memory_limit, "memory"))
        if self.compute_limit is not None:
            object.__setattr__(self, "compute_limit", _check_share(self.compute_limit, "compute"))

    def memory(self, nbytes: int) -> PartitionLimits:
        """These limits with the memory limit set to ``nbytes`` (int > 0)."""
        return dataclasses.replace(self, memory_limit=nbytes)

    def compute(self, share: float) -> PartitionLimits:
        """These limits with the compute share set to ``share`` (0 < share <= 1)."""
        return dataclasses.replace(self, compute_limit=share)


@dataclass(frozen=True)
class PartitionConfig:
    """The device a :class:`PartitionManager` divides.

    :raises InvalidArgumentType: ``total_memory`` is not an integer, or ``total_compute``
        not a number
    :raises InvalidArgument: ``total_memory`` is not > 0, or ``total_compute`` is not in
        (0, 1]
    """

    total_memory: int
    total_compute: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_memory", check_bytes(self.total_memory, "total_memory"))
        object.__setattr__(self, "total_compute", _check_share(self.total_compute, "total_compute"))


@dataclass(frozen=True)
class PartitionInfo:
    """A snapshot of one partition.

    :ivar contexts: names of the attached contexts, in attach order
    :ivar gpu_time_s: all GPU time ever recorded for it (never decays)
    :ivar recent_share: its fraction of the recent (decayed) GPU time of all partitions
    """

    id: str
    name: str
    memory_limit: int
    compute_limit: float
    memory_used: int
    contexts: tuple[str, ...]
    gpu_time_s: float
    recent_share: float


@dataclass
class _Partition:
    name: str
    memory_limit: int
    compute_limit: float
    memory_used: int = 0
    contexts: list[str] = dataclasses.field(default_factory=list)
    gpu_time_s: float = 0.0
    decayed_s: float = 0.0
    last_record: float = -math.inf


class PartitionManager:
    """Partitions of one device, with memory enforcement and compute accounting. Thread-safe.

    :param config: the device's totals
    :param clock: the only source of time (seconds, monotonic); tests pass a fake one
    :param window_s: time constant of the exponential decay of recorded GPU time, and how
        recently another partition must have recorded time to count as contending
    :raises InvalidArgumentType: ``config`` is not a :class:`PartitionConfig`, or
        ``window_s`` not a number
    :raises InvalidArgument: ``window_s`` is not a finite number > 0
    """

    def __init__(
        self,
        config: PartitionConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = 1.0,
    ) -> None:
        self.config = check_instance(
            config, PartitionConfig, "config", "pass PartitionConfig(total_memory=...)"
        )
        self.window_s = check_number(window_s, "window_s", low=0.0, low_open=True)
        self._clock = clock
        self._lock = BookkeepingLock()  # released from memory finalizers: see runtime._locks
        self._parts: dict[str, _Partition] = {}
        self._last = clock()

    def _get(self, id: str, context_name: str | None = None, attached: bool = True) -> _Partition:
        # Callers hold the lock. With context_name, also check it is (or is not) attached.
        part = self._parts.get(id)
        if part is None:
            known = ", ".join(repr(k) for k in self._parts) or "none"
            raise InvalidArgument(
                f"no partition has id {id!r} (known: {known}); create_partition() it first"
            )
        if context_name is not None and (context_name in part.contexts) != attached:
            state = "not attached" if attached else "already attached"
            raise InvalidArgument(
                f"context {context_name!r} is {state} to partition {id!r}; "
                "attach() each context once, before charging or detaching it"
            )
        return part

    def _decay(self) -> float:
        now = self._clock()
        dt = now - self._last
        if dt > 0:  # a clock that steps back decays nothing rather than inflating shares
            factor = math.exp(-dt / self.window_s)
            for part in self._parts.values():
                part.decayed_s *= factor
            self._last = now
        return now

    def _share(self, part: _Partition) -> float:
        total = math.fsum(p.decayed_s for p in self._parts.values())
        return part.decayed_s / total if total > 0 else 0.0

    def _info(self, id: str, p: _Partition) -> PartitionInfo:
        return PartitionInfo(
            id,
            p.name,
            p.memory_limit,
            p.compute_limit,
            p.memory_used,
            tuple(p.contexts),
            p.gpu_time_s,
            self._share(p),
        )

    def create_partition(self, id: str, name: str, limits: PartitionLimits) -> PartitionInfo:
        """Create a partition; unset limits default to what is left unallocated.

        :raises InvalidArgument: ``id`` is taken, or a name is empty
        :raises InvalidArgumentType: an argument has the wrong type
        :raises AdmissionRejected: the limits of all partitions would pass the config's totals
        """
        check_name(id, "partition id")
        check_name(name, "partition name")
        check_instance(
            limits,
            PartitionLimits,
            "limits",
            "build one with PartitionLimits().memory(n).compute(share)",
        )
        with self._lock:
            if id in self._parts:
                raise InvalidArgument(
                    f"a partition with id {id!r} already exists; pick "
                    "another id or delete_partition() it first"
                )
            cfg, parts = self.config, self._parts.values()
            free_mem = cfg.total_memory - sum(p.memory_limit for p in parts)
            free_cpu = cfg.total_compute - math.fsum(p.compute_limit for p in parts)
            memory = free_mem if limits.memory_limit is None else limits.memory_limit
            compute = free_cpu if limits.compute_limit is None else limits.compute_limit
            fix = "; lower it or delete another partition"
            if memory <= 0 or compute <= _EPS:
                reason = (
                    f"no {'memory' if memory <= 0 else 'compute share'} is left "
                    "unallocated for its default limit; set its limits explicitly or "
                    "delete another partition"
                )
            elif memory > free_mem:
                reason = (
                    f"its memory limit of {_fmt_bytes(memory)} does not fit the "
                    f"{_fmt_bytes(free_mem)} of {_fmt_bytes(cfg.total_memory)} not yet "
                    f"given to partitions{fix}"
                )
            elif compute > free_cpu + _EPS:
                reason = (
                    f"its compute limit of {compute:g} does not fit the "
                    f"{max(free_cpu, 0):g} of {cfg.total_compute:g} not yet given to "
                    f"partitions{fix}"
                )
            else:
                part = self._parts[id] = _Partition(name, memory, float(compute))
                return self._info(id, part)
            raise AdmissionRejected(f"partition {id!r}", reason)

    def get_partition(self, id: str) -> PartitionInfo:
        """A snapshot of partition ``id``.

        :raises InvalidArgument: unknown ``id``
        """
        with self._lock:
            self._decay()
            return self._info(id, self._get(id))

    def partitions(self) -> tuple[PartitionInfo, ...]:
        """Snapshots of every partition, in creation order."""
        with self._lock:
            self._decay()
            return tuple(self._info(k, p) for k, p in self._parts.items())

    def delete_partition(self, id: str) -> None:
        """Delete partition ``id``, freeing its limits for others.

        :raises InvalidArgument: unknown ``id``, or contexts are still attached
        """
        with self._lock:
            if contexts := self._get(id).contexts:
                raise InvalidArgument(
                    f"partition {id!r} still has contexts attached ({', '.join(contexts)}); "
                    "destroy or detach them before deleting it"
                )
            del self._parts[id]

    def attach(self, id: str, context_name: str) -> None:
        """Put context ``context_name`` under partition ``id``.

        :raises InvalidArgument: unknown ``id``, or the context is attached already
        """
        with self._lock:
            self._get(id, context_name, False).contexts.append(context_name)

    def detach(self, id: str, context_name: str) -> None:
        """Take context ``context_name`` out of partition ``id``; its charges stay.

        :raises InvalidArgument: unknown ``id``, or the context is not attached to it
        """
        with self._lock:
            self._get(id, context_name).contexts.remove(context_name)

    def charge(self, id: str, context_name: str, nbytes: int) -> None:
        """Record ``nbytes`` allocated by attached context ``context_name``, or refuse them.

        :raises VRAMBudgetExceeded: the partition's memory limit would be passed (nothing is
            recorded then)
        :raises InvalidArgument: unknown ``id``, context not attached, or bad ``nbytes``
        :raises InvalidArgumentType: ``nbytes`` is not an integer
        """
        nbytes = check_bytes(nbytes, "nbytes", allow_zero=True)
        with self._lock:
            part = self._get(id, context_name)
            available = part.memory_limit - part.memory_used
            if nbytes > available:
                raise VRAMBudgetExceeded(
                    context_name,
                    nbytes,
                    available,
                    part.memory_limit,
                    BudgetReason.PARTITION,
                    partition=id,
                )
            part.memory_used += nbytes

    def release(self, id: str, nbytes: int) -> None:
        """Give back ``nbytes`` charged to partition ``id``.

        :raises InvalidArgument: unknown ``id``, or more bytes than are charged
        :raises InvalidArgumentType: ``nbytes`` is not an integer
        """
        nbytes = check_bytes(nbytes, "nbytes", allow_zero=True)
        with self._lock:
            part = self._get(id)
            if nbytes > part.memory_used:
                raise InvalidArgument(
                    f"cannot release {_fmt_bytes(nbytes)} from partition {id!r}: only "
                    f"{_fmt_bytes(part.memory_used)} is charged; release what was charged"
                )
            part.memory_used -= nbytes

    def record_gpu_time(self, id: str, seconds: float) -> None:
        """Add ``seconds`` of GPU time used by partition ``id`` (measured with events).

        :raises InvalidArgument: unknown ``id``, or ``seconds`` not a finite number >= 0
        :raises InvalidArgumentType: ``seconds`` is not a number
        """
        seconds = check_number(seconds, "seconds", low=0.0)
        with self._lock:
            now = self._decay()
            part = self._get(id)
            part.gpu_time_s += seconds
            part.decayed_s += seconds
            part.last_record = now

    def recent_share(self, id: str) -> float:
        """Partition ``id``'s fraction of all partitions' decayed GPU time (0.0 when none).

        :raises InvalidArgument: unknown ``id``
        """
        with self._lock:
            self._decay()
            return self._share(self._get(id))

    def over_share(self, id: str) -> bool:
        """Whether ``id``'s recent share is above its compute limit while another partition
        contends, i.e. recorded GPU time within the last ``window_s`` seconds.

        :raises InvalidArgument: unknown ``id``
        """
        with self._lock:
            now = self._decay()
            part = self._get(id)
            contended = any(
                p is not part and now - p.last_record <= self.window_s for p in self._parts.values()
            )
            return contended and self._share(part) > part.compute_limit

    def __repr__(self) -> str:
        with self._lock:
            parts = ", ".join(
                f"{k}: {_fmt_bytes(p.memory_used)}/{_fmt_bytes(p.memory_limit)} "
                f"compute={p.compute_limit:g} contexts={len(p.contexts)}"
                for k, p in self._parts.items()
            )
            return (
                f"<PartitionManager total={_fmt_bytes(self.config.total_memory)} "
                f"partitions=[{parts}]>"
            )
