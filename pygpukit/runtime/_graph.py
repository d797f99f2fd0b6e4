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

__all__ = ("Graph", "capture_graph")


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
