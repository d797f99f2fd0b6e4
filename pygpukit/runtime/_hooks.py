"""Extension points filled in by the layers above the runtime.

Dependencies point one way (pipeline -> qos -> runtime), so the runtime does not import the
per-tier task scheduler: :mod:`pygpukit.qos` registers a factory here when it is imported
(``import pygpukit`` does that), and every :class:`Runtime` makes its scheduler from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ._context import ExecutionContext
    from ._runtime import Runtime

__all__ = ("ContextAdmission", "TaskScheduler", "make_scheduler", "register_scheduler")


class ContextAdmission(Protocol):
    """What admitting a context returns: partition memory hooks, and its release."""

    def charge(self, nbytes: int) -> None: ...
    def release(self, nbytes: int) -> None: ...
    def close(self) -> None: ...


class TaskScheduler(Protocol):
    def admit_context(
        self, name: str, tier: Any, max_vram: int, base_vram: int, partition: str | None
    ) -> ContextAdmission:
        """Decide whether a context may exist (raises AdmissionRejected / InvalidArgument)."""
        ...

    async def submit(
        self,
        ctx: ExecutionContext,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        priority: int,
        deadline: float | None,
    ) -> Any: ...

    def context_closed(self, ctx: ExecutionContext) -> None: ...
    def close(self) -> None: ...


_factory: Callable[[Runtime], TaskScheduler] | None = None


def register_scheduler(factory: Callable[[Runtime], TaskScheduler]) -> None:
    global _factory
    _factory = factory


def make_scheduler(runtime: Runtime) -> TaskScheduler | None:
    return None if _factory is None else _factory(runtime)
