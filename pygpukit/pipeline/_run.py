"""Running a compiled plan: one task per stage, streamed edges, deadlines, cancellation.

Structure of a run (:func:`drive`)::

    caller task ── task group ── supervisor ── deadline scope ── task group ── stage tasks
                                                                           └─ ...

Stages run in an inner task group owned by a *supervisor* task, never by the caller's
task. So the inner group may be cancelled at any moment (a stage failed, the deadline
passed) without a cancellation ever being delivered into the caller's code — which matters
for :meth:`Pipeline.stream`, whose caller runs its own code between items. The supervisor
reports the outcome (done, or the error) through the same channel as the output items.
"""

from __future__ import annotations

import contextlib
import math
import time
import traceback
from collections.abc import AsyncGenerator, Callable
from dataclasses import replace
from typing import Any

import anyio
from pydantic import BaseModel

from .._exceptions import DeadlineExceeded
from ..runtime import context_session
from ..runtime._session import hook_running_loop
from ._plan import INPUT, Node, Plan
from ._result import PipelineResult, RequestInfo, StageTiming, request_var

__all__ = ("collect", "drive")

#: items a streamed edge holds before its producer waits for the consumer
STREAM_BUFFER = 4


class _Clock:
    __slots__ = ("calls", "end", "first", "items", "start")

    def __init__(self) -> None:
        self.start: float | None = None
        self.end: float | None = None
        self.first: float | None = None
        self.items = 0
        self.calls = 0

    def freeze(self) -> StageTiming:
        return StageTiming(self.start, self.end, self.items, self.first, self.calls)


class _Slot:
    """A once-computed stage output that readers wait for."""

    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.value: BaseModel | None = None


def _unwrap(exc: BaseException) -> BaseException:
    """The one real error inside (nested) exception groups, or the group itself."""
    cancelled = anyio.get_cancelled_exc_class()
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        elif not isinstance(e, cancelled):
            leaves.append(e)

    walk(exc)
    return leaves[0] if len(leaves) == 1 else exc


def _drain(recv: Any) -> None:
    with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
        while True:
            recv.receive_nowait()


class _Run:
    """The state of one execution of a plan."""

    def __init__(
        self, plan: Plan, request: BaseModel, info: RequestInfo, sink: Callable[..., Any]
    ) -> None:
        self.plan = plan
        self.request = request
        self.info = info
        self.sink = sink  # awaitable: sends ("item", model) to the caller
        self.t0 = time.perf_counter()
        self.clocks = {i: _Clock() for i in plan.nodes}
        self.slots = {i: _Slot() for i, n in plan.nodes.items() if not n.per_item}
        self.running: set[str] = set()
        self.edges: dict[tuple[str, str], Any] = {}
        for node in plan.nodes.values():
            if node.stream_source is not None:
                send, recv = anyio.create_memory_object_stream[BaseModel](STREAM_BUFFER)
                self.edges[(node.stream_source, node.id)] = (send, recv)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def _value(self, source: str, field: str) -> Any:
        if source == INPUT:
            return getattr(self.request, field)
        slot = self.slots[source]
        await slot.event.wait()
        return getattr(slot.value, field)

    async def node(self, node: Node) -> None:
        """Run one stage of the plan (a task of the inner task group)."""
        try:
            await self._node(node)
        except anyio.get_cancelled_exc_class() as exc:
            # A cancelled stage's frames (and the arrays they hold) would otherwise live
            # on in the traceback until the garbage collector breaks the cycle the
            # exception ends up in; cancellation must free the memory at once.
            traceback.clear_frames(exc.__traceback__)
            raise

    async def _node(self, node: Node) -> None:
        request_var.set(replace(self.info, stage_id=node.id))
        self.running.add(node.id)
        async with contextlib.AsyncExitStack() as stack:
            outs = [
                stack.enter_context(self.edges[(node.id, r)][0])  # closed when we end
                for r in node.readers
                if (node.id, r) in self.edges
            ]
            fixed = {
                b.field: await self._value(b.source, b.source_field)
                for b in node.bindings
                if b.source != node.stream_source
            }
            emit = self._emitter(node, outs)
            if node.stream_source is None:
                await self._call(node, fixed, emit)
            else:
                per_item = [b for b in node.bindings if b.source == node.stream_source]
                async with self.edges[(node.stream_source, node.id)][1] as items:
                    try:
                        async for item in items:
                            own = {b.field: getattr(item, b.source_field) for b in per_item}
                            await self._call(node, {**fixed, **own}, emit)
                    finally:
                        _drain(items)  # items still buffered hold their producer's memory
        self.running.discard(node.id)

    def _emitter(self, node: Node, outs: list[Any]) -> Callable[[BaseModel], Any]:
        clock = self.clocks[node.id]
        is_output = node.id == self.plan.output

        async def emit(out: BaseModel) -> None:
            if not isinstance(out, node.stage.output_model):
                raise TypeError(
                    f"stage {node.id!r} ({node.stage.qualname}) produced "
                    f"{type(out).__name__}, not {node.stage.output_model.__name__}; "
                    "return (or yield) an instance of its output model"
                )
            clock.items += 1
            if clock.first is None:
                clock.first = self.now()
            if not node.per_item:
                slot = self.slots[node.id]
                slot.value = out
                slot.event.set()
            for send in outs:
                await send.send(out)
            if is_output:
                await self.sink(("item", out))

        return emit

    async def _call(self, node: Node, kwargs: dict[str, Any], emit: Any) -> None:
        inp = node.stage.input_model.model_validate(kwargs)
        clock = self.clocks[node.id]
        clock.calls += 1
        if clock.start is None:
            clock.start = self.now()
        session = context_session(node.ctx) if node.ctx is not None else contextlib.nullcontext()
        async with session:
            if node.stage.streaming:
                async with contextlib.aclosing(node.stage.fn(inp)) as gen:
                    async for out in gen:
                        await emit(out)
            else:
                await emit(await node.stage.fn(inp))
        clock.end = self.now()

    async def _chain(self, chain: list[Node]) -> None:
        for node in chain:
            await self.node(node)

    async def supervise(self) -> None:
        deadline = self.info.deadline
        delay = math.inf if deadline is None else deadline - time.monotonic()
        try:
            with anyio.move_on_after(delay) as scope:
                async with anyio.create_task_group() as tg:
                    for chain in _chains(self.plan):
                        name = f"pipeline {self.plan.name}:{'+'.join(n.id for n in chain)}"
                        tg.start_soon(self._chain, chain, name=name)
            if scope.cancelled_caught:
                message: tuple[str, Any] = ("error", self._late())
            else:
                message = ("done", None)
        except Exception as exc:
            message = ("error", _unwrap(exc))
        await self.sink(message)

    def _late(self) -> DeadlineExceeded:
        cut = ", ".join(repr(i) for i in self.plan.nodes if i in self.running) or "none"
        return DeadlineExceeded(
            f"pipeline {self.plan.name!r} missed its deadline after {self.now() * 1e3:.1f} ms; "
            f"stages cancelled: {cut} — give the request a later deadline or a higher tier"
        )

    def release(self) -> None:
        """Drop what the run still refers to (outputs, buffered items)."""
        for _send, recv in self.edges.values():
            _drain(recv)
        self.edges.clear()
        self.slots.clear()

    def result(self, output: Any) -> PipelineResult:
        out_clock = self.clocks[self.plan.output]
        return PipelineResult(
            output=output,
            timings={i: c.freeze() for i, c in self.clocks.items()},
            first_output_s=out_clock.first,
            elapsed_s=self.now(),
        )


async def collect(plan: Plan, request: BaseModel, info: RequestInfo) -> PipelineResult:
    """Run ``plan`` to the end and gather its output."""
    items: list[Any] = []
    result: PipelineResult | None = None
    async with contextlib.aclosing(drive(plan, request, info)) as gen:
        async for x in gen:
            if isinstance(x, PipelineResult):
                result = x
            else:
                items.append(x)
    assert result is not None
    output = items if plan.nodes[plan.output].per_item else items[0]
    return replace(result, output=output)


async def drive(plan: Plan, request: BaseModel, info: RequestInfo) -> AsyncGenerator[Any, None]:
    """Run ``plan``; yield each output item, then a :class:`PipelineResult` (its
    ``output`` is ``None``; the timings are filled in).

    Callers must close the generator (``aclosing``) if they stop early.
    """
    if info.deadline is not None and info.deadline <= time.monotonic():
        late = (time.monotonic() - info.deadline) * 1e3
        raise DeadlineExceeded(
            f"pipeline {plan.name!r} missed its deadline before it started ({late:.1f} ms "
            "late); no stage ran — give the request a later deadline"
        )
    # Stage tasks must be created on a hooked loop, so that each binds its own context's
    # stream at every step (on CUDA two unhooked tasks may not hold sessions at once).
    hook_running_loop()
    send, recv = anyio.create_memory_object_stream[tuple[str, Any]](STREAM_BUFFER)
    run = _Run(plan, request, info, send.send)
    error: BaseException | None = None
    closed = False
    try:
        with send, recv:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(run.supervise, name=f"pipeline {plan.name}")
                    try:
                        async for kind, value in recv:
                            if kind != "item":
                                error = value
                                break
                            try:
                                yield value
                            except GeneratorExit:  # closed early: leave the group normally
                                closed = True
                                break
                    finally:
                        tg.cancel_scope.cancel()
            finally:
                _drain(recv)  # output items nobody will take
    finally:
        run.release()
    if closed:
        return
    if error is not None:
        raise error
    yield run.result(None)


def _chains(plan: Plan) -> list[list[Node]]:
    """Group the plan into tasks: a stage whose only input is the one stage before it, which
    feeds nothing else, runs in that stage's task right after it (nothing could overlap them
    anyway). Streaming stages and their consumers keep tasks of their own, so items flow
    while they are produced; independent branches stay concurrent."""
    chains: list[list[Node]] = []
    tail: dict[str, list[Node]] = {}  # stage id -> the chain it currently ends
    for node in plan.nodes.values():
        sources = {b.source for b in node.bindings if b.source != INPUT}
        chain = None
        if len(sources) == 1 and not node.per_item:
            (prev_id,) = sources
            prev = plan.nodes[prev_id]
            if prev.readers == (node.id,) and not prev.per_item:
                chain = tail.pop(prev_id, None)
        if chain is None:
            chain = []
            chains.append(chain)
        chain.append(node)
        tail[node.id] = chain
    return chains
