"""QoS: the per-tier task scheduler behind ``ctx.submit``, admission and partitions."""

from ..runtime._hooks import register_scheduler
from ..runtime._tiers import QoSPolicy as QoSPolicy
from ._dispatcher import Dispatcher as Dispatcher
from ._dispatcher import DispatcherConfig as DispatcherConfig
from ._dispatcher import Task as Task
from ._dispatcher import TaskState as TaskState
from ._scheduler import RuntimeScheduler as RuntimeScheduler

__all__ = (
    "Dispatcher",
    "DispatcherConfig",
    "QoSPolicy",
    "RuntimeScheduler",
    "Task",
    "TaskState",
)

register_scheduler(RuntimeScheduler)
