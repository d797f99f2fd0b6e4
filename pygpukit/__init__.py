"""pygpukit: run several AI models on one GPU from async Python, safely.

Everyday names live here; the seed's module-level API is :mod:`pygpukit.scheduler`.
``pygpukit.xp`` is the default runtime's array namespace (CuPy on CUDA, NumPy with budgeted
constructors on the host backend).
"""

from typing import Any

from ._exceptions import AdmissionRejected as AdmissionRejected
from ._exceptions import BackendUnavailable as BackendUnavailable
from ._exceptions import BudgetReason as BudgetReason
from ._exceptions import ContextClosed as ContextClosed
from ._exceptions import ContextError as ContextError
from ._exceptions import CudaError as CudaError
from ._exceptions import DeadlineExceeded as DeadlineExceeded
from ._exceptions import DuplicateContextName as DuplicateContextName
from ._exceptions import InvalidArgument as InvalidArgument
from ._exceptions import InvalidArgumentType as InvalidArgumentType
from ._exceptions import PipelineValidationError as PipelineValidationError
from ._exceptions import PygpukitError as PygpukitError
from ._exceptions import QueueFull as QueueFull
from ._exceptions import VRAMBudgetExceeded as VRAMBudgetExceeded
from ._units import GB as GB
from ._units import KB as KB
from ._units import MB as MB
from .runtime import ContextUsage as ContextUsage
from .runtime import Event as Event
from .runtime import ExecutionContext as ExecutionContext
from .runtime import Graph as Graph
from .runtime import QoSPolicy as QoSPolicy
from .runtime import Runtime as Runtime
from .runtime import Step as Step
from .runtime import Stream as Stream
from .runtime import capture_graph as capture_graph
from .runtime import capture_step as capture_step
from .runtime import context_session as context_session
from .runtime import current_context as current_context
from .runtime import current_stream as current_stream
from .runtime import hook_event_loop as hook_event_loop

__version__ = "0.1.0"

__all__ = (
    "GB",
    "KB",
    "MB",
    "AdmissionRejected",
    "BackendUnavailable",
    "BudgetReason",
    "ContextClosed",
    "ContextError",
    "ContextUsage",
    "CudaError",
    "DeadlineExceeded",
    "DuplicateContextName",
    "Event",
    "ExecutionContext",
    "Graph",
    "InvalidArgument",
    "InvalidArgumentType",
    "PipelineValidationError",
    "PygpukitError",
    "QoSPolicy",
    "QueueFull",
    "Runtime",
    "Step",
    "Stream",
    "VRAMBudgetExceeded",
    "__version__",
    "capture_graph",
    "capture_step",
    "context_session",
    "current_context",
    "current_stream",
    "hook_event_loop",
)


def __getattr__(name: str) -> Any:
    if name == "xp":
        from .scheduler import get_runtime

        return get_runtime().xp
    raise AttributeError(f"module 'pygpukit' has no attribute {name!r}")
