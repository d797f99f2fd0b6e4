"""QoS: the per-tier task scheduler behind ``ctx.submit``, admission and partitions."""

from ..runtime._hooks import register_scheduler
from ..runtime._tiers import QoSPolicy as QoSPolicy
from ._admission import AdmissionAction as AdmissionAction
from ._admission import QosEvaluation as QosEvaluation
from ._admission import QosPolicyEvaluator as QosPolicyEvaluator
from ._admission import QosTaskMeta as QosTaskMeta
from ._dispatcher import Dispatcher as Dispatcher
from ._dispatcher import DispatcherConfig as DispatcherConfig
from ._dispatcher import Task as Task
from ._dispatcher import TaskState as TaskState
from ._partitions import PartitionConfig as PartitionConfig
from ._partitions import PartitionInfo as PartitionInfo
from ._partitions import PartitionLimits as PartitionLimits
from ._partitions import PartitionManager as PartitionManager
from ._scheduler import RuntimeScheduler as RuntimeScheduler

__all__ = (
    "AdmissionAction",
    "Dispatcher",
    "DispatcherConfig",
    "PartitionConfig",
    "PartitionInfo",
    "PartitionLimits",
    "PartitionManager",
    "QoSPolicy",
    "QosEvaluation",
    "QosPolicyEvaluator",
    "QosTaskMeta",
    "RuntimeScheduler",
    "Task",
    "TaskState",
)

register_scheduler(RuntimeScheduler)
