"""Seeing what the runtime does: Prometheus metrics (:mod:`pygpukit.observe.metrics`, the
``metrics`` extra), OpenTelemetry spans (:func:`instrument`, the ``otel`` extra) and
``pygpukit top`` (:mod:`pygpukit.observe.top`). Traces of GPU tasks are a runtime feature:
:meth:`pygpukit.Runtime.trace`.

Nothing here is imported by the runtime: the metrics read its state when scraped, and the
spans are off until :func:`instrument` turns them on.
"""

from .otel import instrument as instrument
from .otel import instrumented as instrumented
from .otel import uninstrument as uninstrument

__all__ = ("instrument", "instrumented", "uninstrument")
