"""Validating a graph of stages and compiling it into the plan a run executes.

Every rejection is a :class:`~pygpukit.PipelineValidationError` whose message names the
stage and the field, states the rule, and says how to fix it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from .._exceptions import InvalidArgument, PipelineValidationError
from ..runtime import ExecutionContext, Runtime
from ._stage import Stage
from ._types import edge_problem, field_type, fmt_type

__all__ = ("INPUT", "Binding", "Entry", "Node", "Plan", "compile_plan")

INPUT = "$input"


@dataclass
class Entry:
    """A stage as added to a pipeline, before validation."""

    id: str
    stage: Stage
    inputs: dict[str, str]
    context: str | ExecutionContext | None


@dataclass(frozen=True)
class Binding:
    """Input ``field`` takes ``source_field`` of ``source`` (a stage id or ``$input``)."""

    field: str
    source: str
    source_field: str


@dataclass(frozen=True)
class Node:
    """A validated stage: where it runs, what it reads, how often it runs.

    :ivar stream_source: the one upstream stage whose items this stage runs once per
    :ivar per_item: it emits many items (it streams, or runs once per streamed item)
    :ivar readers: stages that read its output
    """

    id: str
    stage: Stage
    ctx: ExecutionContext | None
    bindings: tuple[Binding, ...]
    stream_source: str | None
    per_item: bool
    readers: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """A validated graph, ready to run.

    :ivar nodes: by stage id, in the order they were added (sources before their readers
        within each group)
    :ivar groups: stage ids by the task that runs them, one after another; a single group
        means the whole graph is one sequential chain
    """

    name: str
    nodes: dict[str, Node]
    output: str
    request_model: type[BaseModel]
    groups: tuple[tuple[str, ...], ...]

    @property
    def sequential(self) -> bool:
        """Whether every stage only follows the one before it (nothing could overlap)."""
        return len(self.groups) == 1


def _list(names: Any) -> str:
    return ", ".join(repr(n) for n in names)


def _parse(entry: Entry, field: str, source: object) -> tuple[str, str]:
    where = f"stage {entry.id!r} input field {field!r}"
    if isinstance(source, str):
        head, dot, tail = source.partition(".")
        if dot and head and tail.isidentifier():
            return head, tail
    raise PipelineValidationError(
        f"{where} has source {source!r}; a source is '$input.<field>' (the request) or "
        "'<stage_id>.<field>' (another stage's output)"
    )


def _bindings(entry: Entry, ids: dict[str, Entry]) -> list[Binding]:
    fields = entry.stage.input_model.model_fields
    out = []
    for field, source in entry.inputs.items():
        if field not in fields:
            raise PipelineValidationError(
                f"stage {entry.id!r} has no input field {field!r} "
                f"(input fields of {entry.stage.input_model.__name__}: {_list(fields)})"
            )
        src, src_field = _parse(entry, field, source)
        where = f"stage {entry.id!r} input field {field!r}"
        if src != INPUT:
            if src not in ids:
                raise PipelineValidationError(
                    f"{where} reads {source!r}, but there is no stage {src!r} "
                    f"(stages: {_list(ids)})"
                )
            produced = ids[src].stage.output_model.model_fields
            if src_field not in produced:
                raise PipelineValidationError(
                    f"{where} reads {source!r}, but stage {src!r} outputs no field "
                    f"{src_field!r} (output fields of "
                    f"{ids[src].stage.output_model.__name__}: {_list(produced)})"
                )
        out.append(Binding(field, src, src_field))
    for name, info in fields.items():
        if name not in entry.inputs and info.is_required():
            raise PipelineValidationError(
                f"stage {entry.id!r} input field {name!r} has no source and no default; map "
                f"it with inputs={{{name!r}: '$input.{name}'}} or '<stage_id>.<field>'"
            )
    return out


def _check_acyclic(name: str, deps: dict[str, list[str]]) -> list[str]:
    """Stage ids in topological order (sources first)."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in deps[node]:
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                raise PipelineValidationError(
                    f"pipeline {name!r} has a cycle: {' -> '.join(cycle)} (each stage reads "
                    "the next one's output); a stage cannot depend on its own output"
                )
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2
        order.append(node)

    for node in deps:
        if node not in state:
            visit(node)
    return order


def _resolve_context(entry: Entry, runtime: Runtime | None) -> ExecutionContext | None:
    ctx = entry.context
    if ctx is None or isinstance(ctx, ExecutionContext):
        return ctx
    if runtime is None:
        from ..scheduler import get_runtime  # the default runtime, as the seed API uses

        runtime = get_runtime()
    try:
        return runtime.get_context(ctx)
    except InvalidArgument:
        live = _list(c.name for c in runtime.contexts) or "none"
        raise PipelineValidationError(
            f"stage {entry.id!r} runs in context {ctx!r}, but its runtime has no live "
            f"context of that name (live: {live}); create it with "
            f"create_context({ctx!r}, max_vram=...) before building the pipeline"
        ) from None


def _request_model(name: str, reads: dict[str, list[tuple[str, FieldInfo]]]) -> Any:
    fields: dict[str, Any] = {}
    for field, targets in reads.items():
        (first_id, first), *rest = targets
        for other_id, other in rest:
            if field_type(other) != field_type(first):
                raise PipelineValidationError(
                    f"request field {field!r} is read as {fmt_type(field_type(first))} by "
                    f"stage {first_id!r} and as {fmt_type(field_type(other))} by stage "
                    f"{other_id!r}; map them to different '$input.<field>' names"
                )
        required = any(info.is_required() for _, info in targets)
        if required:
            spec = Field(description=first.description)
        elif first.default_factory is not None:
            spec = Field(default_factory=first.default_factory, description=first.description)
        else:
            spec = Field(default=first.default, description=first.description)
        fields[field] = (first.rebuild_annotation(), spec)
    model_name = "".join(p.capitalize() for p in re.split(r"\W|_", name)) or "Pipeline"
    return create_model(f"{model_name}Request", __config__=ConfigDict(extra="forbid"), **fields)


def compile_plan(
    name: str, entries: list[Entry], output: str | None, runtime: Runtime | None
) -> Plan:
    """Validate the graph and compile it.

    :raises PipelineValidationError: see the module doc
    """
    if not entries:
        raise PipelineValidationError(f"pipeline {name!r} has no stages; add one with .add(stage)")
    ids = {e.id: e for e in entries}
    output = entries[-1].id if output is None else output
    if output not in ids:
        raise PipelineValidationError(
            f"pipeline {name!r} output stage {output!r} is not one of its stages ({_list(ids)})"
        )
    bindings = {e.id: _bindings(e, ids) for e in entries}
    deps = {
        i: list(dict.fromkeys(b.source for b in bs if b.source != INPUT))
        for i, bs in bindings.items()
    }
    order = _check_acyclic(name, deps)
    reads: dict[str, list[tuple[str, FieldInfo]]] = {}
    for e in entries:
        fields = e.stage.input_model.model_fields
        for b in bindings[e.id]:
            target = fields[b.field]
            if b.source == INPUT:
                reads.setdefault(b.source_field, []).append((e.id, target))
                continue
            src_stage = ids[b.source].stage
            source = src_stage.output_model.model_fields[b.source_field]
            problem = edge_problem(source, target)
            if problem is not None:
                raise PipelineValidationError(
                    f"stage {e.id!r} input field {b.field!r} expects "
                    f"{fmt_type(field_type(target))}, but '{b.source}.{b.source_field}' is "
                    f"{fmt_type(field_type(source))} ({problem}); change one of the models "
                    "or map another field"
                )
    per_item: dict[str, bool] = {}
    stream_source: dict[str, str | None] = {}
    for i in order:
        streamed = [d for d in deps[i] if per_item[d]]
        if len(streamed) > 1:
            raise PipelineValidationError(
                f"stage {i!r} reads items streamed by both {streamed[0]!r} and "
                f"{streamed[1]!r}; a stage can run once per item of only one stream — "
                "read the other values through the stage that follows that stream"
            )
        stream_source[i] = streamed[0] if streamed else None
        per_item[i] = ids[i].stage.streaming or bool(streamed)
    readers: dict[str, list[str]] = {i: [] for i in ids}
    for i in ids:
        for d in deps[i]:
            readers[d].append(i)
    nodes = {
        e.id: Node(
            id=e.id,
            stage=e.stage,
            ctx=_resolve_context(e, runtime),
            bindings=tuple(bindings[e.id]),
            stream_source=stream_source[e.id],
            per_item=per_item[e.id],
            readers=tuple(readers[e.id]),
        )
        for e in entries
    }
    return Plan(name, nodes, output, _request_model(name, reads), _groups(nodes))


def _groups(nodes: dict[str, Node]) -> tuple[tuple[str, ...], ...]:
    """Group the stages into tasks: a stage whose only input is the one stage before it,
    which feeds nothing else, runs in that stage's task right after it (nothing could
    overlap them anyway). Streaming stages and their consumers keep tasks of their own, so
    items flow while they are produced; independent branches stay concurrent."""
    groups: list[list[str]] = []
    tail: dict[str, list[str]] = {}  # stage id -> the group it currently ends
    for node in nodes.values():
        sources = {b.source for b in node.bindings if b.source != INPUT}
        group = None
        if len(sources) == 1 and not node.per_item:
            (prev_id,) = sources
            prev = nodes[prev_id]
            if prev.readers == (node.id,) and not prev.per_item:
                group = tail.pop(prev_id, None)
        if group is None:
            group = []
            groups.append(group)
        group.append(node.id)
        tail[node.id] = group
    return tuple(tuple(g) for g in groups)
