"""OpenTelemetry spans: turning them on, and continuing a request's trace.

Spans (names and attributes, all under ``pygpukit.``):

- ``pygpukit.pipeline``: one pipeline run (``pipeline``, ``tier``, ``priority``,
  ``outcome``);
- ``pygpukit.stage``: one call of a stage, a child of its run (``pipeline``, ``stage``,
  ``context``);
- ``pygpukit.submit``: one ``ctx.submit`` call, a child of the span current where it was
  called (``context``, ``tier``, ``priority``, ``task``, ``queue_wait_s``, ``gpu_s``,
  ``outcome``).

A failed run, stage or task records its exception and an error status; a cancelled one
only its outcome.
"""

from __future__ import annotations

from typing import Any

from .. import _telemetry

__all__ = ("attach_remote_parent", "detach", "instrument", "instrumented", "uninstrument")


def instrument(tracer_provider: Any = None) -> None:
    """Emit spans for pipeline runs, stages and ``submit`` calls through a tracer of
    ``tracer_provider`` (OpenTelemetry's global provider by default: set up the SDK and
    its exporter first). Until this is called the runtime creates no span and imports no
    part of OpenTelemetry.

    :raises ImportError: ``opentelemetry-api`` is not installed (the ``otel`` extra)
    """
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise ImportError(
            "pygpukit.observe.instrument() needs OpenTelemetry; install it with "
            "pip install 'pygpukit-async[otel]'"
        ) from exc
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("pygpukit-async")
    except PackageNotFoundError:  # run from a source tree
        ours = None
    _telemetry.tracer = trace.get_tracer("pygpukit", ours, tracer_provider=tracer_provider)


def uninstrument() -> None:
    """Stop emitting spans."""
    _telemetry.tracer = None


def instrumented() -> bool:
    return _telemetry.tracer is not None


def attach_remote_parent(headers: list[tuple[bytes, bytes]]) -> object | None:
    """Make the trace a request's ``traceparent`` header names current (W3C trace context,
    through OpenTelemetry's configured propagator), so that the spans its handler starts
    continue the caller's trace. Does nothing while not instrumented, without the header,
    or where a span is current already (an OpenTelemetry ASGI instrumentation made one).
    Returns the token for :func:`detach`, or ``None``."""
    if _telemetry.tracer is None or not any(k == b"traceparent" for k, _ in headers):
        return None
    from opentelemetry import context, propagate, trace

    if trace.get_current_span().get_span_context().is_valid:
        return None
    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
    return context.attach(propagate.extract(carrier))


def detach(token: object) -> None:
    from opentelemetry import context

    context.detach(token)  # type: ignore[arg-type]
