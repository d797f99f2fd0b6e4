"""Stages: typed async functions, and the registry that lets specs name them.

A stage is ``async def f(inp: In) -> Out`` with pydantic models ``In`` and ``Out``, or a
streaming stage ``async def f(inp: In) -> AsyncIterator[Out]`` that ``yield``\\ s items.
"""

from __future__ import annotations

import collections.abc
import inspect
import sys
import threading
import typing
from collections.abc import Callable
from typing import Any, get_args, get_origin, overload

from pydantic import BaseModel

from .._exceptions import InvalidArgumentType, PipelineValidationError
from ..runtime import ExecutionContext
from ..runtime.checks import check_name

__all__ = ("Stage", "StageRegistry", "registry", "stage")

_STREAM_ORIGINS = (
    collections.abc.AsyncIterator,
    collections.abc.AsyncIterable,
    collections.abc.AsyncGenerator,
)


class Stage:
    """One step of a pipeline; made by :func:`stage`.

    :ivar name: the registered name specs refer to
    :ivar input_model: the pydantic model of its one argument
    :ivar output_model: the pydantic model it returns (or yields, when streaming)
    :ivar streaming: whether it is an async generator of output items
    :ivar context: where it runs — a context name, an :class:`ExecutionContext`, or ``None``
    :ivar fn: the decorated function
    """

    __slots__ = ("context", "fn", "input_model", "name", "output_model", "streaming")

    def __init__(
        self,
        name: str,
        fn: Callable[..., Any],
        input_model: type[BaseModel],
        output_model: type[BaseModel],
        *,
        streaming: bool,
        context: str | ExecutionContext | None,
    ) -> None:
        self.name = name
        self.fn = fn
        self.input_model = input_model
        self.output_model = output_model
        self.streaming = streaming
        self.context = context

    @property
    def qualname(self) -> str:
        return f"{self.fn.__module__}.{self.fn.__qualname__}"

    def __repr__(self) -> str:
        ctx = self.context.name if isinstance(self.context, ExecutionContext) else self.context
        kind = "streaming " if self.streaming else ""
        return (
            f"<{kind}Stage {self.name!r} {self.input_model.__name__} -> "
            f"{self.output_model.__name__} context={ctx!r}>"
        )


class StageRegistry:
    """Stages by name, so pipeline specs can refer to them without importing code.

    Registering the same function again (same module and qualified name, as when a module
    is reloaded) replaces the earlier stage; another function may not take a used name.
    """

    def __init__(self) -> None:
        self._stages: dict[str, Stage] = {}
        self._lock = threading.Lock()

    def register(self, stage: Stage) -> Stage:
        """Add ``stage`` under ``stage.name``; return it.

        :raises PipelineValidationError: another function already has that name
        """
        if not isinstance(stage, Stage):
            raise InvalidArgumentType(f"register() takes a Stage, not {type(stage).__name__}")
        with self._lock:
            old = self._stages.get(stage.name)
            if old is not None and old is not stage and old.qualname != stage.qualname:
                raise PipelineValidationError(
                    f"a stage named {stage.name!r} is already registered ({old.qualname}); "
                    f"give {stage.qualname} another name with @stage('other_name')"
                )
            self._stages[stage.name] = stage
        return stage

    def unregister(self, name: str) -> None:
        """Forget the stage called ``name`` (no error if there is none)."""
        with self._lock:
            self._stages.pop(name, None)

    def get(self, name: str) -> Stage:
        """The stage registered as ``name``.

        :raises PipelineValidationError: none is
        """
        try:
            return self._stages[name]
        except KeyError:
            raise PipelineValidationError(
                f"no stage is registered as {name!r} (registered: {_names(self.names())}); "
                "decorate its function with @stage in a module imported before use"
            ) from None

    def names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._stages))

    def __contains__(self, name: object) -> bool:
        return name in self._stages

    def __repr__(self) -> str:
        return f"<StageRegistry {_names(self.names())}>"


def _names(names: collections.abc.Iterable[str]) -> str:
    return ", ".join(repr(n) for n in names) or "none"


registry = StageRegistry()


def _is_model(tp: object) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _inspect(fn: Callable[..., Any], localns: dict[str, Any] | None) -> Stage:
    what = f"stage function {getattr(fn, '__qualname__', fn)!r}"
    streaming = inspect.isasyncgenfunction(fn)
    if not (streaming or inspect.iscoroutinefunction(fn)):
        raise PipelineValidationError(
            f"{what} must be 'async def' returning a pydantic model, or an async generator "
            "('async def' with 'yield') for a streaming stage"
        )
    try:
        hints = typing.get_type_hints(fn, localns=localns)
    except NameError as exc:
        raise PipelineValidationError(
            f"{what} has an annotation that cannot be resolved ({exc}); define its models "
            "at module level or before the function"
        ) from None
    params = list(inspect.signature(fn).parameters.values())
    if len(params) != 1 or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise PipelineValidationError(
            f"{what} must take exactly one positional argument (its input model), "
            f"not {len(params)} parameters"
        )
    inp = hints.get(params[0].name)
    if not _is_model(inp):
        raise PipelineValidationError(
            f"{what} argument {params[0].name!r} must be annotated with a pydantic model, "
            f"not {inp!r}"
        )
    ret = hints.get("return")
    out: object = ret
    if streaming:
        if get_origin(ret) not in _STREAM_ORIGINS:
            raise PipelineValidationError(
                f"{what} is an async generator, so its return annotation must be "
                f"AsyncIterator[Model], not {ret!r}"
            )
        out = get_args(ret)[0]
    elif get_origin(ret) in _STREAM_ORIGINS:
        raise PipelineValidationError(
            f"{what} is annotated to return {ret!r} but is not an async generator; "
            "a streaming stage must 'yield' its items"
        )
    if not _is_model(out):
        raise PipelineValidationError(
            f"{what} must return a pydantic model (or AsyncIterator of one), not {out!r}"
        )
    assert isinstance(inp, type)
    assert isinstance(out, type)
    return Stage(fn.__name__, fn, inp, out, streaming=streaming, context=None)


@overload
def stage(name: Callable[..., Any], *, context: str | ExecutionContext | None = None) -> Stage: ...


@overload
def stage(
    name: str | None = None, *, context: str | ExecutionContext | None = None
) -> Callable[[Callable[..., Any]], Stage]: ...


def stage(
    name: str | Callable[..., Any] | None = None,
    *,
    context: str | ExecutionContext | None = None,
) -> Any:
    """Make an async function a registered pipeline :class:`Stage`.

    Use as ``@stage``, ``@stage("tts")`` or ``@stage("tts", context="tts")``.

    :param name: the registered name (default: the function's name)
    :param context: the execution context it runs in: a name (looked up in the pipeline's
        runtime when the pipeline is built), an :class:`ExecutionContext`, or ``None``
    :raises PipelineValidationError: the function's signature is not one stage model in,
        one stage model out (the message names the function); the name is taken
    """
    if context is not None and not isinstance(context, str | ExecutionContext):
        raise InvalidArgumentType(
            f"stage context must be a context name or an ExecutionContext, not {context!r}"
        )
    frame = sys._getframe(1)
    localns = dict(frame.f_locals) if frame.f_code.co_name != "<module>" else None
    del frame

    def decorate(fn: Callable[..., Any], stage_name: str | None) -> Stage:
        if stage_name is not None:
            check_name(stage_name, "stage name")
        s = _inspect(fn, localns)
        s.name = stage_name or s.name
        s.context = context
        return registry.register(s)

    if callable(name):
        return decorate(name, None)
    return lambda fn: decorate(fn, name)
