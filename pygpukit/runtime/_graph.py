"""CUDA graphs: a function's device work recorded once, then replayed with one launch.

A model step written in Python launches hundreds of small kernels; launching them costs
more CPU (and GIL) time than the GPU spends running them. :func:`capture_graph` records the
kernels the function enqueues on the current context's stream; :meth:`Graph.launch`
enqueues all of them again in one call. The work must use the same buffers every time
(write new inputs into the buffers the capture saw), which is what a fixed-shape step does.

The memory the function allocates while captured is charged to the context and belongs to
the graph until :meth:`Graph.close`: every replay writes to those same addresses, so they
must not go back to the pool while the graph can still run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._exceptions import InvalidArgument
from ._context import ExecutionContext, _current

if TYPE_CHECKING:
    from ._backends import RawGraph
    from ._stream import Stream

__all__ = ("Graph", "Step", "capture_graph", "capture_step")


class Graph:
    """Device work captured by :func:`capture_graph`."""

    __slots__ = ("_ctx", "_raw")

    def __init__(self, raw: RawGraph, ctx: ExecutionContext) -> None:
        self._raw = raw
        self._ctx = ctx

    def launch(self, stream: Stream | None = None) -> None:
        """Enqueue the captured work on ``stream``.

        The default is the calling task's context stream (or, outside any session, the
        stream of the context the graph was captured in). Await the stream as usual.
        """
        if stream is None:
            ctx = _current.get() or self._ctx
            stream = ctx.stream
        self._raw.launch(stream._open())

    def close(self) -> None:
        """Wait for the last replay, then free the graph's memory; idempotent."""
        self._raw.close()

    def __enter__(self) -> Graph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def capture_graph(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Graph:
    """Record the device work ``fn(*args, **kwargs)`` enqueues, without running it.

    Call it where a context is current (inside ``context_session(ctx)`` or a function run
    by ``ctx.submit``). Run ``fn`` once normally before capturing it: its first call may
    compile kernels or create library handles, which a capture cannot record. On the host
    backend array work is done on the calling thread, so a launch simply calls ``fn`` again.

    The graph holds ``fn`` (and its arguments) for as long as it lives. An object that keeps
    its graphs should not capture its own bound method: the graph would hold the object
    and the object its graph, a cycle that only the garbage collector frees — with every
    buffer the object holds still charged to the context until then. Capture a function
    that holds it weakly instead (``pygpukit.models.lm.FixedStep`` does).

    :raises InvalidArgument: no context is current, or ``fn`` is not callable
    """
    if not callable(fn):
        raise InvalidArgument(f"capture_graph() needs a callable, not {type(fn).__name__}")
    ctx = _current.get()
    if ctx is None:
        raise InvalidArgument(
            "capture_graph() records work on the current context's stream; call it inside "
            "'with context_session(ctx)' or in a function run by ctx.submit()"
        )
    ctx._check_open()
    rt = ctx.runtime
    call = functools.partial(fn, *args, **kwargs) if args or kwargs else fn
    return Graph(rt.backend.capture(ctx.stream.raw, call), ctx)


class Step:
    """A fixed-shape step replayed from a graph: ``step(*inputs)`` copies the inputs into the
    buffers the capture read, launches the graph and returns its outputs — the same objects
    every call, overwritten by the next one (copy what you keep)."""

    __slots__ = ("_inputs", "_out", "graph")

    def __init__(self, graph: Graph, inputs: list[Any], out: dict[str, Any]) -> None:
        self.graph = graph
        self._inputs = inputs
        self._out = out

    def __call__(self, *inputs: Any) -> Any:
        if len(inputs) != len(self._inputs):
            raise InvalidArgument(
                f"this step was captured with {len(self._inputs)} input(s), not {len(inputs)}"
            )
        for buffer, value in zip(self._inputs, inputs, strict=True):
            _copy_into(buffer, value)
        self.graph.launch()
        return self._out["value"]

    def close(self) -> None:
        """Free the graph and its buffers (see :meth:`Graph.close`)."""
        self.graph.close()


def _copy_into(buffer: Any, value: Any) -> None:
    if hasattr(buffer, "copy_"):  # a torch tensor
        buffer.copy_(value)
    else:  # CuPy or NumPy
        buffer[...] = value


def capture_step(fn: Callable[..., Any], /, *inputs: Any) -> Step:
    """Capture a model's repeated step — ``fn(*inputs)`` on fixed-shape arrays or tensors —
    as a :class:`Step` that replays it with one launch (a decode step of a model with a
    static cache, say): several eager models on launcher threads then stop taking turns at
    the GIL to launch their kernels one by one.

    ``fn`` runs once eagerly first (so that libraries create their handles and workspaces
    outside the capture) on copies of ``inputs``, which become the step's input buffers.
    Its memory, PyTorch's included, is charged to the current context and kept until
    :meth:`Step.close`. Random-number kernels replay the numbers drawn at capture: sample
    from device-side state that the step itself advances.

    :raises InvalidArgument: no context is current (see :func:`capture_graph`)
    """
    buffers = [x.clone() if hasattr(x, "clone") else x.copy() for x in inputs]
    out: dict[str, Any] = {}

    def body() -> None:
        out["value"] = fn(*buffers)

    body()  # eager: handles, workspaces, first-call compilation
    return Step(capture_graph(body), buffers, out)
