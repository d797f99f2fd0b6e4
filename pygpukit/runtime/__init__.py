"""Devices, streams, events, completion, execution contexts, memory and sessions.

Completion: a :class:`CompletionBridge` turns stream positions into awaitables; a runtime
uses :func:`default_bridge` unless given one, built on a channel from :func:`make_channel`
(``CompletionBridge(make_channel("python"))`` is the fallback without the C extension). At
most :data:`COMPLETION_CAPACITY` completions are awaited on one bridge at once.
"""

from ._backends import DeviceInfo as DeviceInfo
from ._channel import CAPACITY as COMPLETION_CAPACITY
from ._channel import make_channel as make_channel
from ._completion import BridgeStats as BridgeStats
from ._completion import CompletionBridge as CompletionBridge
from ._completion import default_bridge as default_bridge
from ._context import ContextState as ContextState
from ._context import ContextUsage as ContextUsage
from ._context import ExecutionContext as ExecutionContext
from ._graph import Graph as Graph
from ._graph import capture_graph as capture_graph
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
    "COMPLETION_CAPACITY",
    "BridgeStats",
    "CompletionBridge",
    "ContextState",
    "ContextUsage",
    "DeviceInfo",
    "Event",
    "ExecutionContext",
    "Graph",
    "HandleState",
    "QoSPolicy",
    "Runtime",
    "Stream",
    "capture_graph",
    "context_session",
    "current_context",
    "current_stream",
    "default_bridge",
    "hook_event_loop",
    "make_channel",
)

for _name in __all__:
    if not isinstance(globals()[_name], int):  # a number has no __module__ to set
        globals()[_name].__module__ = __name__
del _name
