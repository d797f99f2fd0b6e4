"""The seed's low-level objects (``import _pygpukit_rust as rust``, or this module).

A :class:`QosPolicyEvaluator` is a standalone admission book with the same reservation rule
and wording as a runtime's ledger (:func:`pygpukit.runtime.check_reservation`);
``rt.use_partitions(manager)`` makes a :class:`PartitionManager`'s limits govern the
runtime's contexts created with ``partition=``.
:class:`MemoryPool` is :class:`pygpukit.runtime.MemoryPool` drawing, unless told otherwise,
from the process-wide default runtime (:func:`pygpukit.scheduler.get_runtime`).
"""

from __future__ import annotations

from .qos import AdmissionAction as AdmissionAction
from .qos import PartitionConfig as PartitionConfig
from .qos import PartitionInfo as PartitionInfo
from .qos import PartitionLimits as PartitionLimits
from .qos import PartitionManager as PartitionManager
from .qos import QosEvaluation as QosEvaluation
from .qos import QosPolicyEvaluator as QosPolicyEvaluator
from .qos import QosTaskMeta as QosTaskMeta
from .runtime import Block as Block
from .runtime import MemoryPool as _RuntimeMemoryPool
from .runtime import PoolStats as PoolStats
from .runtime import Runtime as _Runtime
from .scheduler import get_runtime as _get_runtime

__all__ = (
    "AdmissionAction",
    "Block",
    "MemoryPool",
    "PartitionConfig",
    "PartitionInfo",
    "PartitionLimits",
    "PartitionManager",
    "PoolStats",
    "QosEvaluation",
    "QosPolicyEvaluator",
    "QosTaskMeta",
)


class MemoryPool(_RuntimeMemoryPool):
    """A quota of device memory handing out :class:`Block` objects, with optional LRU
    eviction to host memory: ``MemoryPool(quota=100 * MB, enable_eviction=True)``.

    :param quota: device bytes the pool may hold (live blocks plus cached free ones)
    :param enable_eviction: spill LRU blocks to host memory instead of failing
    :param runtime: whose device (the default runtime, started if need be, if omitted)
    :raises InvalidArgumentType: ``quota`` is not an integer
    :raises InvalidArgument: ``quota`` is not positive
    """

    def __init__(
        self, quota: int, enable_eviction: bool = False, *, runtime: _Runtime | None = None
    ) -> None:
        super().__init__(
            quota, enable_eviction, runtime=_get_runtime() if runtime is None else runtime
        )
