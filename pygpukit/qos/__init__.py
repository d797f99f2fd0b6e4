"""QoS: the seed's admission evaluator and partition manager.

The tiers themselves (:class:`QoSPolicy`) and the per-tier task queue (the runtime's default
scheduling policy, :class:`~pygpukit.runtime.Dispatcher`) belong to the runtime. A
:class:`PartitionManager` is enforced by the runtime it is given to
(``rt.use_partitions(manager)``); a :class:`QosPolicyEvaluator` is a standalone admission book.
"""

from ..runtime import QoSPolicy as QoSPolicy
from ._admission import AdmissionAction as AdmissionAction
from ._admission import QosEvaluation as QosEvaluation
from ._admission import QosPolicyEvaluator as QosPolicyEvaluator
from ._admission import QosTaskMeta as QosTaskMeta
from ._partitions import PartitionConfig as PartitionConfig
from ._partitions import PartitionInfo as PartitionInfo
from ._partitions import PartitionLimits as PartitionLimits
from ._partitions import PartitionManager as PartitionManager

__all__ = (
    "AdmissionAction",
    "PartitionConfig",
    "PartitionInfo",
    "PartitionLimits",
    "PartitionManager",
    "QoSPolicy",
    "QosEvaluation",
    "QosPolicyEvaluator",
    "QosTaskMeta",
)
