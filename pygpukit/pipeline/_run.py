"""Running a compiled plan: stages in turn or in tasks, streamed edges, deadlines,
cancellation.

A plan that is one sequential chain (:attr:`Plan.sequential`: each stage only follows the
one before it), run to the end by :func:`collect`, runs *inline*: the caller's task awaits
each stage in turn inside its context's session, the way one would await the stage
functions by hand, but in a copy of the caller's context variables, as a task would be.
Nothing could overlap anyway, and a task, a task group and a channel per run cost more
than the stages' own Python (and a dozen loop iterations). A deadline is a cancel scope
around the chain; the caller's cancellation reaches the running stage directly.

Every other run (and every :meth:`Pipeline.stream`) is *driven* (:func:`drive`)::

    caller task ── task group ── supervisor ── deadline scope ── task group ── stage tasks
                                                                           └─ ...

Stages run in an inner task group owned by a *supervisor* task, never by the caller's
task. So the inner group may be cancelled at any moment (a stage failed, the deadline
passed) without a cancellation ever being delivered into the caller's code — which matters
for :meth:`Pipeline.stream`, whose caller runs its own code between items. The supervisor
reports the outcome (done, or the error) through the same channel as the output items.

A run raises one error, never an exception group: the first error a stage raised. Stages
that fail at the same moment (two branches refused by a full queue, say) all fail before
the cancellation reaches them; the first failure is raised and each later one is named in a
note on it (:pep:`678`; tracebacks print the notes), so ``except QueueFull`` and an HTTP
error mapping see the error a stage raised, whatever the plan's shape.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import time
import traceback
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any

import anyio
from pydantic import BaseModel

from .. import _telemetry
from .._exceptions import DeadlineExceeded
from ..runtime import bind_each_step, context_session, hook_running_loop, steps_are_bound
from ._plan import INPUT, Node, Plan
from ._result import PipelineResult, RequestInfo, StageTiming, request_var
from ._stats import stats_for

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


def _drain(recv: Any) -> None:
    with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
        while True:
            recv.receive_nowait()


def _may_run_inline() -> bool:
    """Whether the calling task may hold its stages' sessions itself.

    On CUDA the runtime re-binds a task's stream at every step only for tasks created on a
    hooked loop; an older task (``asyncio.run``'s main task, when the runtime was made
    inside it) binds at session entry only, and two such tasks may not hold sessions at
    once. Stages run in such a task would inherit that limit, so they get a task of their
    own, which is created hooked. Host-only programs bind no stream and may always.
    """
    return steps_are_bound()


class _InOwnContext:
    """Awaits a coroutine in the calling task, but with every step run in a copy of the
    caller's :mod:`contextvars` context, as a task of its own would be: what the stages set
    (their sessions, :func:`current_request`, the user's own variables) never leaks into
    the caller. The stream of the session current *in that copy* is bound around each step
    (the task's own binding reads the caller's context, not this one).
    """

    __slots__ = ("_coro", "_ctx")

    def __init__(self, coro: Coroutine[Any, Any, None]) -> None:
        self._coro = bind_each_step(coro)
        self._ctx = contextvars.copy_context()

    def __await__(self) -> _InOwnContext:
        return self

    def __iter__(self) -> _InOwnContext:
        return self

    def __next__(self) -> Any:
        return self._ctx.run(self._coro.send, None)

    def send(self, value: Any) -> Any:
        return self._ctx.run(self._coro.send, value)

    def throw(self, *args: Any) -> Any:
        return self._ctx.run(self._coro.throw, *args)

    def close(self) -> None:
        self._ctx.run(self._coro.close)


class _Run:
    """The state of one execution of a plan."""

    def __init__(self, plan: Plan, request: BaseModel, info: RequestInfo) -> None:
        self.plan = plan
        self.request = request
        self.info = info
        self.t0 = time.perf_counter()
        self.clocks = {i: _Clock() for i in plan.nodes}
        self.values: dict[str, BaseModel] = {}  # outputs of stages that run once
        self.ready: dict[str, anyio.Event] = {}  # set when values[id] is (driven runs)
        self.running: set[str] = set()
        self.edges: dict[tuple[str, str], Any] = {}
        self.outputs: list[BaseModel] = []  # output items, when not sent to a sink
        self.sink: Callable[..., Any] | None = None  # awaitable; sends ("item", model)
        self.failures: list[tuple[str, Exception]] = []  # (stage id, error), as they failed
        self.stats = stats_for(plan.name)
        self.ended = False  # its outcome is counted (and its span ended)
        self.span: Any = None
        self.tracer = _telemetry.tracer  # read once: spans may be turned off meanwhile
        if self.tracer is not None:
            self.span = self.tracer.start_span(
                "pygpukit.pipeline",
                attributes={
                    "pygpukit.pipeline": plan.name,
                    "pygpukit.tier": "" if info.tier is None else info.tier.name,
                    "pygpukit.priority": info.priority,
                },
            )

    def now(self) -> float:
        return time.perf_counter() - self.t0

    # -- one stage ----------------------------------------------------------------------
    async def _value(self, source: str, field: str) -> Any:
        if source == INPUT:
            return getattr(self.request, field)
        value = self.values.get(source)
        if value is None:  # another task computes it
            await self.ready[source].wait()
            value = self.values[source]
        return getattr(value, field)

    async def node(self, node: Node) -> None:
        """Run one stage of the plan."""
        info = self.info
        token = request_var.set(
            RequestInfo(info.tier, info.priority, info.deadline, info.pipeline, node.id)
        )
        try:
            await self._node(node)
        except anyio.get_cancelled_exc_class() as exc:
            # A cancelled stage's frames (and the arrays they hold) would otherwise live
            # on in the traceback until the garbage collector breaks the cycle the
            # exception ends up in; cancellation must free the memory at once.
            traceback.clear_frames(exc.__traceback__)
            raise
        except Exception as exc:
            self.failures.append((node.id, exc))
            raise
        finally:
            request_var.reset(token)  # the next stage of the chain sets its own

    async def _node(self, node: Node) -> None:
        self.running.add(node.id)
        if not self.edges:  # fast path: no streamed edge anywhere in the plan
            fixed = {b.field: await self._value(b.source, b.source_field) for b in node.bindings}
            await self._call(node, fixed, self._emitter(node, []))
            self.running.discard(node.id)
            return
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
                self.values[node.id] = out
                ready = self.ready.get(node.id)
                if ready is not None:
                    ready.set()
            for send in outs:
                await send.send(out)
            if is_output:
                if self.sink is None:
                    self.outputs.append(out)
                else:
                    await self.sink(("item", out))

        return emit

    async def _call(self, node: Node, kwargs: dict[str, Any], emit: Any) -> None:
        inp = node.stage.input_model.model_validate(kwargs)
        clock = self.clocks[node.id]
        clock.calls += 1
        if clock.start is None:
            clock.start = self.now()
        session = context_session(node.ctx) if node.ctx is not None else contextlib.nullcontext()
        span = contextlib.nullcontext() if self.span is None else self._stage_span(node)
        with span:
            async with session:
                if node.stage.streaming:
                    async with contextlib.aclosing(node.stage.fn(inp)) as gen:
                        async for out in gen:
                            await emit(out)
                else:
                    await emit(await node.stage.fn(inp))
        clock.end = self.now()

    def _stage_span(self, node: Node) -> contextlib.AbstractContextManager[Any]:
        """The span of one stage call, current while it runs (the ``submit`` spans of the
        stage nest in it), a child of the run's span."""
        from opentelemetry import trace

        return self.tracer.start_as_current_span(  # type: ignore[no-any-return]
            "pygpukit.stage",
            context=trace.set_span_in_context(self.span),
            attributes={
                "pygpukit.pipeline": self.plan.name,
                "pygpukit.stage": node.id,
                "pygpukit.context": "" if node.ctx is None else node.ctx.name,
            },
        )

    async def _chain(self, chain: list[Node]) -> None:
        deadline = self.info.deadline
        for node in chain:
            # Stages that never yield give the deadline's cancel scope no chance to fire;
            # the next stage must not start late all the same.
            if deadline is not None and time.monotonic() >= deadline:
                self.running.add(node.id)
                raise self._late()
            await self.node(node)

    # -- a sequential plan, in the caller's task ------------------------------------------
    async def inline(self) -> PipelineResult:
        """Run a sequential plan in the calling task (in a task of its own where the
        calling task may not hold sessions, see :func:`_may_run_inline`)."""
        chain = [self.plan.nodes[i] for i in self.plan.groups[0]]
        deadline = self.info.deadline
        try:
            if deadline is None:
                await self._inline_chain(chain)
            else:
                with anyio.move_on_after(deadline - time.monotonic()) as scope:
                    await self._inline_chain(chain)
                if scope.cancelled_caught:
                    raise self._late()
        except BaseException as exc:
            self.release()  # a traceback keeping this run alive keeps no stage's output
            self.end(exc)
            raise
        output = self.outputs if self.plan.nodes[self.plan.output].per_item else self.outputs[0]
        return self.result(output)

    async def _inline_chain(self, chain: list[Node]) -> None:
        if _may_run_inline():
            await _InOwnContext(self._chain(chain))
            return
        hook_running_loop()  # so that the task is created hooked
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._chain, chain, name=f"pipeline {self.plan.name}")
        except Exception as exc:
            raise self.one_error(exc) from None

    # -- any plan, in tasks of its own ----------------------------------------------------
    def start_driven(self, sink: Callable[..., Any]) -> None:
        """Prepare the channels a driven run needs; ``sink`` takes the output items."""
        self.sink = sink
        for node in self.plan.nodes.values():
            if not node.per_item:
                self.ready[node.id] = anyio.Event()
            if node.stream_source is not None:
                send, recv = anyio.create_memory_object_stream[BaseModel](STREAM_BUFFER)
                self.edges[(node.stream_source, node.id)] = (send, recv)

    async def supervise(self) -> None:
        assert self.sink is not None
        deadline = self.info.deadline
        delay = math.inf if deadline is None else deadline - time.monotonic()
        try:
            with anyio.move_on_after(delay) as scope:
                async with anyio.create_task_group() as tg:
                    for group in self.plan.groups:
                        chain = [self.plan.nodes[i] for i in group]
                        name = f"pipeline {self.plan.name}:{'+'.join(group)}"
                        tg.start_soon(self._chain, chain, name=name)
            if scope.cancelled_caught:
                message: tuple[str, Any] = ("error", self._late())
            else:
                message = ("done", None)
        except Exception as exc:
            message = ("error", self.one_error(exc))
        await self.sink(message)

    def one_error(self, group: BaseException) -> BaseException:
        """The error the run raises for its task group's ``group``: the first error a stage
        raised (cancellations are not errors), with a note naming each later one.

        The first failure is the cause; the others happened at the same moment, before the
        cancellation it started reached them. An error that no stage recorded (raised
        between stages) ranks after those that were.
        """
        cancelled = anyio.get_cancelled_exc_class()
        errors: list[BaseException] = []
        pending = [group]
        while pending:
            exc = pending.pop(0)
            if isinstance(exc, BaseExceptionGroup):
                pending[:0] = exc.exceptions
            elif not isinstance(exc, cancelled):
                errors.append(exc)
        if not errors:
            return group
        order = {id(exc): i for i, (_, exc) in enumerate(self.failures)}
        stage_of = {id(exc): stage_id for stage_id, exc in self.failures}
        errors.sort(key=lambda e: order.get(id(e), len(order)))
        first = errors[0]
        for other in errors[1:]:
            where = stage_of.get(id(other))
            who = "a stage" if where is None else f"stage {where!r}"
            first.add_note(
                f"{who} of pipeline {self.plan.name!r} failed at the same time: "
                f"{type(other).__name__}: {other}"
            )
        return first

    def _late(self) -> DeadlineExceeded:
        deadline = self.info.deadline
        return DeadlineExceeded(
            f"pipeline {self.plan.name!r}",
            late_s=0.0 if deadline is None else time.monotonic() - deadline,
            cancelled=[i for i in self.plan.nodes if i in self.running],
        )

    def release(self) -> None:
        """Drop what the run still refers to (outputs, buffered items)."""
        for _send, recv in self.edges.values():
            _drain(recv)
        self.edges.clear()
        self.values.clear()
        self.outputs.clear()
        self.failures.clear()

    def result(self, output: Any) -> PipelineResult:
        out_clock = self.clocks[self.plan.output]
        result = PipelineResult(
            output=output,
            timings={i: c.freeze() for i, c in self.clocks.items()},
            first_output_s=out_clock.first,
            elapsed_s=self.now(),
        )
        stats = self.stats
        for stage_id, clock in self.clocks.items():
            if clock.start is not None and clock.end is not None:
                stats.stage(stage_id).observe(clock.end - clock.start)
        if result.first_output_s is not None:
            stats.first_output_s.observe(result.first_output_s)
        stats.elapsed_s.observe(result.elapsed_s)
        self.end(None)
        return result

    def end(self, exc: BaseException | None) -> None:
        """Count how the run ended (``exc``: what it raised), once; end its span."""
        if self.ended:
            return
        self.ended = True
        self.stats.runs[_telemetry.outcome(exc)] += 1
        if self.span is not None:
            _telemetry.end_span(self.span, exc)


def _check_deadline(plan: Plan, info: RequestInfo) -> None:
    if info.deadline is not None and info.deadline <= time.monotonic():
        stats_for(plan.name).runs["deadline_exceeded"] += 1
        raise DeadlineExceeded(f"pipeline {plan.name!r}", late_s=time.monotonic() - info.deadline)


async def collect(plan: Plan, request: BaseModel, info: RequestInfo) -> PipelineResult:
    """Run ``plan`` to the end and gather its output."""
    if plan.sequential:
        _check_deadline(plan, info)
        return await _Run(plan, request, info).inline()
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
    return PipelineResult(output, result.timings, result.first_output_s, result.elapsed_s)


async def drive(plan: Plan, request: BaseModel, info: RequestInfo) -> AsyncGenerator[Any, None]:
    """Run ``plan``; yield each output item, then a :class:`PipelineResult` (its
    ``output`` is ``None``; the timings are filled in).

    Callers must close the generator (``aclosing``) if they stop early.
    """
    _check_deadline(plan, info)
    # Stage tasks must be created on a hooked loop, so that each binds its own context's
    # stream at every step (on CUDA two unhooked tasks may not hold sessions at once).
    hook_running_loop()
    send, recv = anyio.create_memory_object_stream[tuple[str, Any]](STREAM_BUFFER)
    run = _Run(plan, request, info)
    run.start_driven(send.send)
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
    except BaseException as exc:  # the caller was cancelled
        run.end(exc)
        raise
    finally:
        run.release()
    if closed:
        run.end(GeneratorExit())  # the caller stopped reading: cancelled
        return
    if error is not None:
        run.end(error)
        raise error
    yield run.result(None)
