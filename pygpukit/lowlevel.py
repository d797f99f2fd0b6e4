"""The seed's low-level objects (``import pygpukit.lowlevel as rust``).

The same classes the runtime uses: a runtime's admission is a :class:`QosPolicyEvaluator`
(``rt.scheduler.admission``), and ``rt.scheduler.use_partitions(manager)`` makes a
:class:`PartitionManager`'s limits govern contexts created with ``partition=``.
"""

from .qos._admission import AdmissionAction as AdmissionAction
from .qos._admission import QosEvaluation as QosEvaluation
from .qos._admission import QosPolicyEvaluator as QosPolicyEvaluator
from .qos._admission import QosTaskMeta as QosTaskMeta
from .qos._partitions import PartitionConfig as PartitionConfig
from .qos._partitions import PartitionInfo as PartitionInfo
from .qos._partitions import PartitionLimits as PartitionLimits
from .qos._partitions import PartitionManager as PartitionManager
from .runtime._lru_pool import Block as Block
from .runtime._lru_pool import MemoryPool as MemoryPool
from .runtime._lru_pool import PoolStats as PoolStats

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
