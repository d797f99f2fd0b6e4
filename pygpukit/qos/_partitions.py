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

from .._exceptions import AdmissionRejected, InvalidArgument, VRAMBudgetExceeded, _fmt_bytes
from .._locks import BookkeepingLock

__all__ = ("PartitionConfig", "PartitionInfo", "PartitionLimits", "PartitionManager")

#: Slack for float compute shares, so 0.7 + 0.3 fits a total of 1.0.
_EPS = 1e-9


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_bytes(value: object, what: str, *, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        rule = ">= 0" if low == 0 else "> 0"
        raise InvalidArgument(
            f"{what} must be an int number of bytes {rule}, got {value!r}; pass e.g. 4 * GB"
        )


def _check_share(value: object, what: str) -> None:
    if not (isinstance(value, int | float) and not isinstance(value, bool) and 0 < value <= 1):
        raise InvalidArgument(
            f"{what} must be a share of the device in (0.0, 1.0], got {value!r}; pass e.g. 0.5"
        )


@dataclass(frozen=True)
class PartitionLimits:
    """A partition's limits, built fluently: ``PartitionLimits().memory(4 * GB).compute(0.5)``.

    Each builder method returns a new object. A limit left unset (``None``) defaults, when
    the partition is created, to what the other partitions left: all unallocated memory,
    all the remaining compute share.

    :raises InvalidArgument: memory is not an int > 0, or compute is not in (0, 1]
    """

    memory_limit: int | None = None
    compute_limit: float | None = None

    def __post_init__(self) -> None:
        if self.memory_limit is not None:
            _check_bytes(self.memory_limit, "memory limit")
        if self.compute_limit is not None:
            _check_share(self.compute_limit, "compute limit")

    def memory(self, nbytes: int) -> PartitionLimits:
        """These limits with the memory limit set to ``nbytes`` (int > 0)."""
        return dataclasses.replace(self, memory_limit=nbytes)

    def compute(self, share: float) -> PartitionLimits:
        """These limits with the compute share set to ``share`` (0 < share <= 1)."""
        return dataclasses.replace(self, compute_limit=share)


@dataclass(frozen=True)
class PartitionConfig:
    """The device a :class:`PartitionManager` divides.

    :raises InvalidArgument: ``total_memory`` is not an int > 0, or ``total_compute`` is
        not in (0, 1]
    """

    total_memory: int
    total_compute: float = 1.0

    def __post_init__(self) -> None:
        _check_bytes(self.total_memory, "total_memory")
        _check_share(self.total_compute, "total_compute")


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
    :raises InvalidArgument: ``config`` or ``window_s`` is invalid
    """

    def __init__(
        self,
        config: PartitionConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = 1.0,
    ) -> None:
        if not isinstance(config, PartitionConfig):
            raise InvalidArgument(f"config must be a PartitionConfig, got {config!r}")
        if not (_is_real(window_s) and 0 < window_s < math.inf):
            raise InvalidArgument(f"window_s must be a finite number > 0, got {window_s!r}")
        self.config = config
        self.window_s = float(window_s)
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

        :raises InvalidArgument: ``id`` is taken, or an argument has the wrong type
        :raises AdmissionRejected: the limits of all partitions would pass the config's totals
        """
        for value, what in ((id, "partition id"), (name, "partition name")):
            if not isinstance(value, str) or not value:
                raise InvalidArgument(f"{what} must be a non-empty str, got {value!r}")
        if not isinstance(limits, PartitionLimits):
            raise InvalidArgument(
                f"limits must be a PartitionLimits, got {limits!r}; build "
                "one with PartitionLimits().memory(n).compute(share)"
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
        """
        _check_bytes(nbytes, "nbytes", low=0)
        with self._lock:
            part = self._get(id, context_name)
            available = part.memory_limit - part.memory_used
            if nbytes > available:
                raise VRAMBudgetExceeded(
                    context_name,
                    nbytes,
                    available,
                    part.memory_limit,
                    reason=f"partition {id!r} memory limit",
                )
            part.memory_used += nbytes

    def release(self, id: str, nbytes: int) -> None:
        """Give back ``nbytes`` charged to partition ``id``.

        :raises InvalidArgument: unknown ``id``, or more bytes than are charged
        """
        _check_bytes(nbytes, "nbytes", low=0)
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
        """
        if not (_is_real(seconds) and 0 <= seconds < math.inf):
            raise InvalidArgument(f"seconds must be a finite number >= 0, got {seconds!r}")
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
