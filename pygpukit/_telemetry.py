"""OpenTelemetry spans for pipeline runs, stages and ``submit`` calls.

Off until :func:`pygpukit.observe.instrument` sets :data:`tracer`: until then each of
those paths reads one module global and does nothing else, and nothing imports
``opentelemetry``. A span's parent is the span current where it starts (OpenTelemetry keeps
it in a context variable), so a request's span, a pipeline run and the ``submit`` calls of
its stages nest as they were called.
"""

from __future__ import annotations

from typing import Any

from ._exceptions import DeadlineExceeded, QueueFull

__all__ = ("OUTCOMES", "end_span", "end_task_span", "outcome", "start_task_span", "tracer")

#: how a task or a pipeline run can end: what :func:`outcome` answers, and the metrics'
#: ``outcome`` label
OUTCOMES = ("ok", "failed", "cancelled", "deadline_exceeded", "queue_full")

#: an ``opentelemetry.trace.Tracer`` while instrumented, else ``None``
tracer: Any = None


def outcome(exc: BaseException | None) -> str:
    """What a task or a run ended as: the label its metrics and spans use."""
    if exc is None:
        return "ok"
    if isinstance(exc, QueueFull):
        return "queue_full"
    if isinstance(exc, DeadlineExceeded):
        return "deadline_exceeded"
    if _is_cancellation(exc):
        return "cancelled"
    return "failed"


def _is_cancellation(exc: BaseException) -> bool:
    import asyncio

    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return True
    return type(exc).__name__ == "Cancelled" and type(exc).__module__.startswith("trio")


def start_task_span(tracer: Any, task: Any) -> Any:
    """A span for one ``submit``, from ``tracer`` (:data:`tracer`, read once by the
    caller)."""
    return tracer.start_span(
        "pygpukit.submit",
        attributes={
            "pygpukit.context": task.context.name,
            "pygpukit.tier": task.tier.name,
            "pygpukit.priority": task.priority,
            "pygpukit.task": getattr(task.fn, "__qualname__", type(task.fn).__name__),
        },
    )


def end_task_span(span: Any, task: Any, exc: BaseException | None) -> None:
    """End a ``submit`` span with its queue wait and GPU time (0 for a task that never
    launched)."""
    if task.t_launched:
        span.set_attribute("pygpukit.queue_wait_s", task.t_launched - task.t_queued)
    span.set_attribute("pygpukit.gpu_s", task.gpu_ms / 1e3)
    end_span(span, exc)


def end_span(span: Any, exc: BaseException | None) -> None:
    """Set the outcome (an error status for a failure) and end ``span``."""
    label = outcome(exc)
    span.set_attribute("pygpukit.outcome", label)
    if exc is not None and label != "cancelled":
        from opentelemetry.trace import Status, StatusCode

        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
    span.end()
