"""OpenTelemetry spans for pipeline runs, stages and submits, and a request's trace
continued from its ``traceparent`` header."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

pytest.importorskip("opentelemetry.sdk.trace")
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

from pygpukit import _telemetry
from pygpukit.observe import instrument, instrumented, uninstrument
from pygpukit.pipeline import Pipeline, stage
from pygpukit.runtime import QoSPolicy, Runtime

pytestmark = pytest.mark.anyio
MiB = 1 << 20


class Num(BaseModel):
    x: int


class Half(BaseModel):
    y: int


def _times_two(x: int) -> int:
    return 2 * x


def _fails(x: int) -> int:
    raise ValueError(f"refusing {x}")


@stage("otel_first", context="otel-a")
async def first(inp: Num) -> Num:
    from pygpukit.runtime import current_context

    ctx = current_context()
    assert ctx is not None
    return Num(x=await ctx.submit(_times_two, inp.x))


@stage("otel_second", context="otel-b")
async def second(inp: Num) -> Half:
    from pygpukit.runtime import current_context

    ctx = current_context()
    assert ctx is not None
    fn = _fails if inp.x < 0 else _times_two
    return Half(y=await ctx.submit(fn, inp.x))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    instrument(_provider_of(exporter))
    try:
        yield exporter
    finally:
        uninstrument()


def _runtime() -> Runtime:
    rt = Runtime(backend="host")
    rt.create_context("otel-a", 4 * MiB, qos=QoSPolicy.GUARANTEED)
    rt.create_context("otel-b", 4 * MiB, qos=QoSPolicy.BEST_EFFORT)
    return rt


def _by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


def _parent(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


async def test_a_run_its_stages_and_their_submits_nest(spans: InMemorySpanExporter) -> None:
    with _runtime() as rt:
        pipe = Pipeline.chain("otel-pipe", first, second, runtime=rt).build()
        result = await pipe.run({"x": 3}, tier="guaranteed", priority=2)
        assert result.output.y == 12
    got = _by_name(spans)
    (run,) = got["pygpukit.pipeline"]
    assert run.attributes is not None
    assert dict(run.attributes) == {
        "pygpukit.pipeline": "otel-pipe",
        "pygpukit.tier": "GUARANTEED",
        "pygpukit.priority": 2,
        "pygpukit.outcome": "ok",
    }
    stages = {s.attributes["pygpukit.stage"]: s for s in got["pygpukit.stage"]}  # type: ignore[index]
    assert set(stages) == {"otel_first", "otel_second"}
    assert all(_parent(s) == run.context.span_id for s in stages.values())
    assert stages["otel_first"].attributes["pygpukit.context"] == "otel-a"  # type: ignore[index]
    submits = got["pygpukit.submit"]
    assert len(submits) == 2
    for sub in submits:
        attrs = dict(sub.attributes or {})
        owner = stages["otel_first" if attrs["pygpukit.context"] == "otel-a" else "otel_second"]
        assert _parent(sub) == owner.context.span_id
        assert sub.context.trace_id == run.context.trace_id
        assert attrs["pygpukit.outcome"] == "ok"
        assert attrs["pygpukit.task"] == "_times_two"
        assert attrs["pygpukit.queue_wait_s"] >= 0 and attrs["pygpukit.gpu_s"] >= 0
        assert attrs["pygpukit.tier"] == (
            "GUARANTEED" if owner is stages["otel_first"] else "BEST_EFFORT"
        )


async def test_a_failure_is_an_error_status_with_its_exception(
    spans: InMemorySpanExporter,
) -> None:
    with _runtime() as rt:
        pipe = Pipeline.chain("otel-fails", first, second, runtime=rt).build()
        with pytest.raises(ValueError, match="refusing"):
            await pipe.run({"x": -1})
    got = _by_name(spans)
    failed = [s for s in got["pygpukit.submit"] if s.status.status_code is StatusCode.ERROR]
    (sub,) = failed
    assert sub.attributes is not None and sub.attributes["pygpukit.outcome"] == "failed"
    assert any(e.name == "exception" for e in sub.events)
    (run,) = got["pygpukit.pipeline"]
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes is not None and run.attributes["pygpukit.outcome"] == "failed"


async def test_a_cancelled_submit_is_not_an_error(spans: InMemorySpanExporter) -> None:
    import threading

    with _runtime() as rt:
        ctx = rt.get_context("otel-a")
        gate = threading.Event()
        with anyio.move_on_after(0.05):
            await ctx.submit(gate.wait, 5)
        gate.set()
        await ctx.submit(lambda: None)  # the gate task finished before this one ran
    subs = _by_name(spans)["pygpukit.submit"]
    cancelled = [
        s for s in subs if s.attributes and s.attributes["pygpukit.outcome"] == "cancelled"
    ]
    assert len(cancelled) == 1
    assert cancelled[0].status.status_code is not StatusCode.ERROR


async def test_submits_nest_in_the_callers_span(spans: InMemorySpanExporter) -> None:
    from opentelemetry import trace

    tracer = trace.get_tracer("test", tracer_provider=_provider_of(spans))
    with _runtime() as rt:
        ctx = rt.get_context("otel-b")
        with tracer.start_as_current_span("request") as request:
            await ctx.submit(_times_two, 1)
    (sub,) = _by_name(spans)["pygpukit.submit"]
    assert _parent(sub) == request.get_span_context().span_id


def _provider_of(exporter: InMemorySpanExporter) -> Any:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


async def test_nothing_is_traced_until_instrumented_or_once_uninstrumented() -> None:
    assert not instrumented() and _telemetry.tracer is None
    exporter = InMemorySpanExporter()
    instrument(_provider_of(exporter))
    with _runtime() as rt:
        pipe = Pipeline.chain("otel-off", first, second, runtime=rt).build()
        await pipe.run({"x": 1})
        assert len(exporter.get_finished_spans()) == 5  # a run, two stages, two submits
        uninstrument()
        assert not instrumented()
        await pipe.run({"x": 1})
    assert len(exporter.get_finished_spans()) == 5  # none more


@pytest.fixture
def asyncio_only(anyio_backend: Any) -> None:
    if anyio_backend[0] != "asyncio":
        pytest.skip("FastAPI runs on asyncio")


async def test_a_requests_traceparent_continues_into_its_runs(
    spans: InMemorySpanExporter, asyncio_only: None
) -> None:
    httpx = pytest.importorskip("httpx")
    from fastapi import FastAPI

    from pygpukit.integrations.fastapi import Pygpukit

    def setup(rt: Runtime) -> dict[str, Any]:
        rt.create_context("otel-a", 4 * MiB)
        rt.create_context("otel-b", 4 * MiB)
        return {"p": Pipeline.chain("otel-http", first, second, runtime=rt).build()}

    gpu = Pygpukit(setup, backend="host", admission=None)
    app = FastAPI(lifespan=gpu.lifespan)
    gpu.install(app)

    @app.post("/run")
    async def run(body: Num) -> dict[str, int]:
        result = await gpu.get_pipeline("p").run(body)
        return {"y": result.output.y}

    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        r = await client.post(
            "/run", json={"x": 1}, headers={"traceparent": f"00-{trace_id}-{parent_id}-01"}
        )
        assert r.status_code == 200 and r.json() == {"y": 4}
        r = await client.post("/run", json={"x": 2})  # no header: a trace of its own
        assert r.status_code == 200
    runs = _by_name(spans)["pygpukit.pipeline"]
    assert len(runs) == 2
    continued, own = sorted(runs, key=lambda s: s.start_time or 0)
    assert continued.context.trace_id == int(trace_id, 16)
    assert _parent(continued) == int(parent_id, 16)
    assert own.context.trace_id != int(trace_id, 16) and own.parent is None
