"""Devices, streams, events, completion, execution contexts, memory and sessions."""

from ._backends import DeviceInfo as DeviceInfo
from ._completion import BridgeStats as BridgeStats
from ._completion import CompletionBridge as CompletionBridge
from ._completion import default_bridge as default_bridge
from ._context import ContextState as ContextState
from ._context import ContextUsage as ContextUsage
from ._context import ExecutionContext as ExecutionContext
from ._graph import Graph as Graph
from ._graph import capture_graph as capture_graph
from ._lru_pool import Block as Block
from ._lru_pool import MemoryPool as MemoryPool
from ._lru_pool import PoolStats as PoolStats
from ._reservation import ReservationVerdict as ReservationVerdict
from ._reservation import check_reservation as check_reservation
from ._runtime import Runtime as Runtime
from ._session import context_session as context_session
from ._session import current_context as current_context
from ._session import current_stream as current_stream
from ._session import hook_event_loop as hook_event_loop
from ._stream import Event as Event
from ._stream import HandleState as HandleState
from ._stream import Stream as Stream
from ._tiers import QoSPolicy as QoSPolicy

__all__ = (
    "Block",
    "BridgeStats",
    "CompletionBridge",
    "ContextState",
    "ContextUsage",
    "DeviceInfo",
    "Event",
    "ExecutionContext",
    "Graph",
    "HandleState",
    "MemoryPool",
    "PoolStats",
    "QoSPolicy",
    "ReservationVerdict",
    "Runtime",
    "Stream",
    "capture_graph",
    "check_reservation",
    "context_session",
    "current_context",
    "current_stream",
    "default_bridge",
    "hook_event_loop",
)

for _name in __all__:
    globals()[_name].__module__ = __name__
del _name
