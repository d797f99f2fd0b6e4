"""What a run returns and what its stages can see: results, timings, request info."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ..runtime import QoSPolicy

__all__ = (
    "PipelineResult",
    "PipelineStream",
    "RequestInfo",
    "StageTiming",
    "current_request",
)


@dataclass(frozen=True)
class RequestInfo:
    """What every stage of a run can see through :func:`current_request`.

    :ivar tier: the request's QoS tier, or ``None``
    :ivar priority: lower runs first (as in ``ctx.submit``)
    :ivar deadline: a ``time.monotonic()`` time, as ``ctx.submit(deadline=...)`` takes, or
        ``None``
    :ivar pipeline: the pipeline's name
    :ivar stage_id: the id of the stage reading it
    """

    tier: QoSPolicy | None
    priority: int
    deadline: float | None
    pipeline: str
    stage_id: str


request_var: ContextVar[RequestInfo | None] = ContextVar("pygpukit_request", default=None)


def current_request() -> RequestInfo | None:
    """The request the calling stage serves, or ``None`` outside a pipeline stage."""
    return request_var.get()


@dataclass(frozen=True)
class StageTiming:
    """When a stage ran, in seconds since the run started (``time.perf_counter()``).

    :ivar start: when its first call began (``None``: it never ran)
    :ivar end: when its last call ended
    :ivar items: output items it produced
    :ivar first_item_at: when it produced its first item
    :ivar calls: how often it was called (once, or once per streamed item)
    """

    start: float | None
    end: float | None
    items: int
    first_item_at: float | None
    calls: int = 0


@dataclass(frozen=True)
class PipelineResult:
    """The outcome of :meth:`Pipeline.run`.

    :ivar output: the output stage's model instance, or a list of them when that stage
        ran once per streamed item
    :ivar timings: per stage id
    :ivar first_output_s: seconds from the start to the first output item
    :ivar elapsed_s: seconds from the start to the end
    """

    output: Any
    timings: dict[str, StageTiming]
    first_output_s: float | None
    elapsed_s: float


class PipelineStream:
    """The output items of one run, as they are produced (from :meth:`Pipeline.stream`).

    ``async for item in stream`` works on its own when the loop runs to the end; to stop
    early, use ``async with pipeline.stream(...) as items:`` (or ``contextlib.aclosing``),
    which cancels the remaining stages when the block ends.
    """

    def __init__(self, gen: AsyncGenerator[Any, None]) -> None:
        self._gen = gen
        #: per-stage timings, once the run has ended normally
        self.timings: dict[str, StageTiming] | None = None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        item = await self._gen.__anext__()
        if not isinstance(item, PipelineResult):
            return item
        self.timings = item.timings
        await self._gen.aclose()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        """Stop the run (cancelling its stages); idempotent."""
        await self._gen.aclose()

    async def __aenter__(self) -> PipelineStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
