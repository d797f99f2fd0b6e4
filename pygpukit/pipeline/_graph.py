"""``Pipeline``: a graph of stages built in code, validated once, run many times."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from .._exceptions import InvalidArgumentType, PipelineValidationError
from ..runtime import ExecutionContext, QoSPolicy, Runtime
from ..runtime.checks import check_deadline, check_name, check_priority
from ._plan import INPUT, Entry, Plan, compile_plan
from ._result import PipelineResult, PipelineStream, RequestInfo
from ._run import collect, drive
from ._stage import Stage, registry

__all__ = ("Pipeline",)


def _check_id(stage_id: object) -> str:
    if not isinstance(stage_id, str):
        raise InvalidArgumentType(
            f"stage id must be a str, not {stage_id!r}; pass an identifier such as 'tts'"
        )
    if not stage_id.isidentifier():
        raise PipelineValidationError(
            f"stage id {stage_id!r} must be a Python identifier (letters, digits, '_'), "
            "because sources are written '<stage_id>.<field>'"
        )
    return stage_id


class Pipeline:
    """A typed graph of stages.

    ``Pipeline("speak").add(llm).add(tts)`` chains ``tts`` after ``llm``; ``inputs=`` maps
    input fields to sources explicitly (fan-out: two stages read one source; fan-in: one
    stage reads several). :meth:`build` validates; :meth:`run` and :meth:`stream` execute.

    :param name: the pipeline's name (used in messages and the request model's name)
    :param runtime: where context names are looked up (default: the default runtime)
    """

    def __init__(self, name: str, runtime: Runtime | None = None) -> None:
        check_name(name, "pipeline name")
        if runtime is not None and not isinstance(runtime, Runtime):
            raise InvalidArgumentType(f"runtime must be a Runtime or None, not {runtime!r}")
        self.name = name
        self.runtime = runtime
        self._entries: list[Entry] = []
        self._output: str | None = None
        self._plan: Plan | None = None

    @classmethod
    def chain(cls, name: str, *stages: Stage | str, runtime: Runtime | None = None) -> Pipeline:
        """A pipeline running ``stages`` one after another (each reads the previous)."""
        pipeline = cls(name, runtime)
        for s in stages:
            pipeline.add(s)
        return pipeline

    def add(
        self,
        stage: Stage | str,
        *,
        id: str | None = None,
        inputs: Mapping[str, str] | None = None,
        context: str | ExecutionContext | None = None,
    ) -> Pipeline:
        """Add ``stage`` (or the stage registered under that name); return ``self``.

        :param id: its id in this graph (default: the stage's name)
        :param inputs: input field -> ``"$input.<field>"`` or ``"<stage_id>.<field>"``.
            Default: the first stage reads same-named request fields; a later stage reads
            the same-named output fields of the stage added just before it.
        :param context: run it in this context instead of the stage's own
        :raises PipelineValidationError: the id is taken or is not an identifier
        """
        if isinstance(stage, str):
            stage = registry.get(stage)
        if not isinstance(stage, Stage):
            raise InvalidArgumentType(
                f"add() takes a Stage (an @stage function) or a registered stage name, "
                f"not {type(stage).__name__}"
            )
        stage_id = _check_id(stage.name if id is None else id)
        if any(e.id == stage_id for e in self._entries):
            raise PipelineValidationError(
                f"pipeline {self.name!r} already has a stage with id {stage_id!r}; "
                "pass add(..., id='another_id')"
            )
        if inputs is None:
            fields = stage.input_model.model_fields
            if not self._entries:
                mapping = {f: f"{INPUT}.{f}" for f in fields}
            else:
                prev = self._entries[-1]
                produced = prev.stage.output_model.model_fields
                mapping = {f: f"{prev.id}.{f}" for f in fields if f in produced}
        elif isinstance(inputs, Mapping):
            mapping = dict(inputs)
        else:
            raise InvalidArgumentType(
                f"inputs must be a mapping of input field to source, not {inputs!r}"
            )
        if context is not None and not isinstance(context, str | ExecutionContext):
            raise InvalidArgumentType(
                f"context must be a context name or an ExecutionContext, not {context!r}"
            )
        self._entries.append(Entry(stage_id, stage, mapping, context or stage.context))
        self._plan = None
        return self

    def output(self, stage_id: str) -> Pipeline:
        """Make ``stage_id``'s output the pipeline's result (default: the last added)."""
        self._output = _check_id(stage_id)
        self._plan = None
        return self

    def build(self) -> Pipeline:
        """Validate the graph (once; again after changes); return ``self``.

        :raises PipelineValidationError: a cycle, an input with no source and no default, a
            source naming an unknown stage or field, a type/dtype/shape mismatch on an edge,
            a stage reading two streams, or an unknown context name — the message names the
            stage and field
        """
        if self._plan is None:
            self._plan = compile_plan(self.name, self._entries, self._output, self.runtime)
        return self

    @property
    def plan(self) -> Plan:
        self.build()
        assert self._plan is not None
        return self._plan

    @property
    def request_model(self) -> type[BaseModel]:
        """The pydantic model of a request: one field per ``$input.<field>`` read."""
        return self.plan.request_model

    @property
    def output_model(self) -> type[BaseModel]:
        """The output stage's model (``PipelineResult.output`` is one, or a list of them)."""
        return self.plan.nodes[self.plan.output].stage.output_model

    @property
    def stage_ids(self) -> tuple[str, ...]:
        return tuple(e.id for e in self._entries)

    def _prepare(
        self, request: object, tier: object, priority: object, deadline: object
    ) -> tuple[Plan, BaseModel, RequestInfo]:
        plan = self.plan
        model = plan.request_model
        if isinstance(request, model):
            req = request
        elif isinstance(request, Mapping):
            req = model.model_validate(dict(request))
        else:
            req = model.model_validate(request, from_attributes=True)
        priority = check_priority(priority)
        deadline = check_deadline(deadline)
        info = RequestInfo(
            tier=None if tier is None else QoSPolicy.coerce(tier),
            priority=priority,
            deadline=None if deadline is None else float(deadline),
            pipeline=self.name,
            stage_id="",
        )
        return plan, req, info

    async def run(
        self,
        request: BaseModel | Mapping[str, Any],
        *,
        tier: QoSPolicy | str | None = None,
        priority: int = 0,
        deadline: float | None = None,
    ) -> PipelineResult:
        """Run the pipeline once; return the output stage's result and per-stage timings.

        Independent stages run concurrently; a streaming stage's readers run once per
        item as items arrive. A graph that is one chain (each stage reads only the one
        before it) runs in the calling task, one stage after another, each stage still
        setting context variables of its own as if it were a task. Every stage sees
        ``tier``, ``priority`` and ``deadline`` through :func:`current_request`.
        Cancelling the call cancels every stage.

        :param request: a :attr:`request_model` instance or a mapping of its fields
        :param deadline: a ``time.monotonic()`` time by which the whole run must finish
        :raises DeadlineExceeded: the deadline passed (stages still running are cancelled;
            none starts when it had passed already)
        :raises pydantic.ValidationError: the request does not fit :attr:`request_model`
        :raises Exception: whatever a stage raised (the others are cancelled), never an
            exception group: when several stages fail at the same moment (two branches
            refused by a full queue), the first error is raised, with a note naming each
            of the others (``exc.__notes__``)
        """
        return await collect(*self._prepare(request, tier, priority, deadline))

    def stream(
        self,
        request: BaseModel | Mapping[str, Any],
        *,
        tier: QoSPolicy | str | None = None,
        priority: int = 0,
        deadline: float | None = None,
    ) -> PipelineStream:
        """Like :meth:`run`, but yield the output stage's items as they are produced.

        ``async for item in pipeline.stream(req)``; to stop early without leaking the run,
        ``async with pipeline.stream(req) as items: async for item in items: ...``.
        A failed run raises from the iteration one error, as :meth:`run` does.
        """
        return PipelineStream(drive(*self._prepare(request, tier, priority, deadline)))

    def __repr__(self) -> str:
        state = "built" if self._plan is not None else "unbuilt"
        return f"<Pipeline {self.name!r} stages={list(self.stage_ids)} {state}>"
