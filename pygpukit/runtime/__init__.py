"""Devices, streams, events, completion, execution contexts, memory and sessions.

Completion: a :class:`CompletionBridge` turns stream positions into awaitables; a runtime
uses :func:`default_bridge` unless given one, built on a channel from :func:`make_channel`
(``CompletionBridge(make_channel("python"))`` is the fallback without the C extension). At
most :data:`COMPLETION_CAPACITY` completions are awaited on one bridge at once.
"""

import types

from ._backends import DeviceInfo as DeviceInfo
from ._channel import CAPACITY as COMPLETION_CAPACITY
from ._channel import make_channel as make_channel
from ._completion import BridgeStats as BridgeStats
from ._completion import CompletionBridge as CompletionBridge
from ._completion import default_bridge as default_bridge
from ._context import ContextState as ContextState
from ._context import ContextUsage as ContextUsage
from ._context import ExecutionContext as ExecutionContext
from ._dispatch import Dispatcher as Dispatcher
from ._dispatch import DispatcherConfig as DispatcherConfig
from ._evict import Evictable as Evictable
from ._evict import EvictableModule as EvictableModule
from ._graph import Graph as Graph
from ._graph import Step as Step
from ._graph import capture_graph as capture_graph
from ._graph import capture_step as capture_step
from ._health import HealthState as HealthState
from ._health import RuntimeHealth as RuntimeHealth
from ._launcher import LauncherConfig as LauncherConfig
from ._ledger import PressureHandler as PressureHandler
from ._lru_pool import Block as Block
from ._lru_pool import MemoryPool as MemoryPool
from ._lru_pool import PoolStats as PoolStats
from ._reservation import ReservationVerdict as ReservationVerdict
from ._reservation import check_reservation as check_reservation
from ._runtime import Runtime as Runtime
from ._session import bind_each_step as bind_each_step
from ._session import context_session as context_session
from ._session import current_context as current_context
from ._session import current_stream as current_stream
from ._session import hook_event_loop as hook_event_loop
from ._session import hook_future_loops as hook_future_loops
from ._session import hook_running_loop as hook_running_loop
from ._session import steps_are_bound as steps_are_bound
from ._stream import Event as Event
from ._stream import HandleState as HandleState
from ._stream import Stream as Stream
from ._tasks import PartitionPolicy as PartitionPolicy
from ._tasks import SchedulingPolicy as SchedulingPolicy
from ._tasks import Task as Task
from ._tasks import TaskState as TaskState
from ._tiers import QoSPolicy as QoSPolicy
from ._trace import Trace as Trace

__all__ = (
    "COMPLETION_CAPACITY",
    "Block",
    "BridgeStats",
    "CompletionBridge",
    "ContextState",
    "ContextUsage",
    "DeviceInfo",
    "Dispatcher",
    "DispatcherConfig",
    "Event",
    "Evictable",
    "EvictableModule",
    "ExecutionContext",
    "Graph",
    "HandleState",
    "HealthState",
    "LauncherConfig",
    "MemoryPool",
    "PartitionPolicy",
    "PoolStats",
    "PressureHandler",
    "QoSPolicy",
    "ReservationVerdict",
    "Runtime",
    "RuntimeHealth",
    "SchedulingPolicy",
    "Step",
    "Stream",
    "Task",
    "TaskState",
    "Trace",
    "bind_each_step",
    "capture_graph",
    "capture_step",
    "check_reservation",
    "context_session",
    "current_context",
    "current_stream",
    "default_bridge",
    "hook_event_loop",
    "hook_future_loops",
    "hook_running_loop",
    "make_channel",
    "steps_are_bound",
)

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type | types.FunctionType):  # not numbers or type aliases
        _obj.__module__ = __name__
del _name, _obj
