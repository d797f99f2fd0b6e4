"""Prometheus metrics: what /metrics carries, that it agrees with usage(), that counters
move with the work done, and what a scrape costs."""

from __future__ import annotations

import statistics
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from conftest import load_example
from pydantic import BaseModel

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from pygpukit import (  # noqa: E402
    AdmissionRejected,
    DeadlineExceeded,
    QueueFull,
    VRAMBudgetExceeded,
)
from pygpukit.observe.metrics import (  # noqa: E402
    PygpukitCollector,
    render,
    start_metrics_server,
)
from pygpukit.pipeline import Pipeline, stage  # noqa: E402
from pygpukit.runtime import (  # noqa: E402
    Dispatcher,
    DispatcherConfig,
    QoSPolicy,
    Runtime,
    context_session,
)

pytestmark = pytest.mark.anyio
DASHBOARD = Path(__file__).resolve().parents[1] / "examples" / "grafana" / "pygpukit-dashboard.json"
MiB = 1 << 20
CTX = {"context", "tier", "device", "partition"}

#: every metric the issue asks for, with the labels its samples carry (le aside)
REQUIRED: dict[str, set[str]] = {
    "pygpukit_context_memory_used_bytes": CTX,
    "pygpukit_context_memory_held_bytes": CTX,
    "pygpukit_context_memory_peak_bytes": CTX,
    "pygpukit_context_memory_budget_bytes": CTX,
    "pygpukit_context_memory_reserved_bytes": CTX,
    "pygpukit_tasks_total": CTX | {"outcome"},
    "pygpukit_tasks_queued": CTX,
    "pygpukit_tasks_in_flight": CTX,
    "pygpukit_task_queue_wait_seconds_bucket": CTX,
    "pygpukit_task_gpu_seconds_bucket": CTX,
    "pygpukit_evictions_total": CTX,
    "pygpukit_evicted_bytes_total": CTX,
    "pygpukit_restores_total": CTX,
    "pygpukit_admission_rejections_total": {"pipeline"},
    "pygpukit_pipeline_stage_seconds_bucket": {"pipeline", "stage"},
    "pygpukit_pipeline_first_output_seconds_bucket": {"pipeline"},
    "pygpukit_device_memory_managed_bytes": {"device"},
    "pygpukit_completions_total": set(),
    "pygpukit_device_faults_total": {"device"},
}


@pytest.fixture
def anyio_backend() -> str:  # FastAPI/starlette run on asyncio here
    return "asyncio"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, labels), through prometheus-client's own parser."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def ctx_labels(ctx: Any) -> dict[str, str]:
    return {
        "context": ctx.name,
        "tier": ctx.qos.name,
        "device": str(ctx.device_id),
        "partition": ctx.partition or "",
    }


def _server_module() -> Any:
    return load_example("examples/pipelines/server.py", "example_server_metrics")


async def test_the_example_servers_metrics_parse_agree_with_usage_and_count_requests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYGPUKIT_BACKEND", "host")
    app = _server_module().create_app()
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        gpu = app.state.pygpukit
        rt = gpu.runtime
        names = {service: gpu.pipelines[service].name for service in ("interactive", "batch")}

        async def ask(service: str, i: int) -> None:
            r = await client.post(
                f"/assistant/{service}", json={"prompt": f"p{i}", "max_new_tokens": 8}
            )
            assert r.status_code == 200, r.text

        await ask("interactive", -1)  # every series exists before the first scrape
        await ask("batch", -1)
        before_usage = {c.name: c.usage() for c in rt.contexts}
        r = await client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        before = parse(r.text)
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(ask, "interactive", i)
                for i in range(2):
                    tg.start_soon(ask, "batch", i)
        after = parse((await client.get("/metrics")).text)

        # every required name, each with exactly its labels
        seen: dict[str, set[str]] = {}
        for name, labels in after:
            seen.setdefault(name, set()).update(k for k, _ in labels if k != "le")
        for name, labels in REQUIRED.items():
            assert name in seen, f"/metrics lacks {name}"
            assert seen[name] == labels, (name, seen[name])

        # the values are usage()'s
        assert rt.contexts
        for ctx in rt.contexts:
            u, lab = ctx.usage(), ctx_labels(ctx)
            for key, field in (
                ("used", "used"),
                ("held", "held"),
                ("peak", "peak"),
                ("budget", "max"),
                ("reserved", "reserved"),
            ):
                got = value(after, f"pygpukit_context_memory_{key}_bytes", **lab)
                assert got == getattr(u, field), (ctx.name, key)
            ok = value(after, "pygpukit_tasks_total", **lab, outcome="ok")
            failed = value(after, "pygpukit_tasks_total", **lab, outcome="failed")
            assert (ok, failed) == (u.tasks - u.failed, u.failed)
            assert value(after, "pygpukit_task_gpu_seconds_count", **lab) == u.tasks
            assert value(after, "pygpukit_task_queue_wait_seconds_count", **lab) == u.tasks
            gpu_s = value(after, "pygpukit_task_gpu_seconds_sum", **lab)
            assert gpu_s == pytest.approx(u.gpu_time_s, rel=1e-9, abs=1e-12)
            assert value(after, "pygpukit_tasks_in_flight", **lab) == 0
            # counters moved by the work the requests did, as usage() did
            moved = ok - value(before, "pygpukit_tasks_total", **lab, outcome="ok")
            assert moved == u.tasks - before_usage[ctx.name].tasks
            if ctx.name.startswith(("interactive", "batch")):
                assert moved > 0, ctx.name
        for service, n in (("interactive", 3), ("batch", 2)):
            name = names[service]
            for metric, labels in (
                ("pygpukit_pipeline_runs_total", {"pipeline": name, "outcome": "ok"}),
                ("pygpukit_admission_admitted_total", {"pipeline": service}),
                ("pygpukit_pipeline_first_output_seconds_count", {"pipeline": name}),
            ):
                delta = value(after, metric, **labels) - value(before, metric, **labels)
                assert delta == n, (metric, labels)
        managed = value(after, "pygpukit_device_memory_managed_bytes", device="0")
        assert managed == rt.ledger.capacity
        completions = value(after, "pygpukit_completions_total")
        assert completions - value(before, "pygpukit_completions_total") > 0


async def test_each_way_a_task_ends_is_counted_as_usage_counts_it() -> None:
    config = DispatcherConfig(context_in_flight=1, max_queued=2)
    with Runtime(backend="host", policy=Dispatcher(config)) as rt:
        ctx = rt.create_context("c", 4 * MiB, qos=QoSPolicy.BURSTABLE)
        gate = threading.Event()

        def blocked() -> None:
            assert gate.wait(10)

        def boom() -> None:
            raise ValueError("boom")

        async def cancelled_while_queued() -> None:
            with anyio.move_on_after(0.05):
                await ctx.submit(blocked)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ctx.submit, blocked)  # in flight: the others queue
                await anyio.sleep(0.05)
                tg.start_soon(cancelled_while_queued)
                with pytest.raises(DeadlineExceeded):
                    await ctx.submit(blocked, deadline=time.monotonic() + 0.05)
                tg.start_soon(ctx.submit, blocked)  # queued, runs once released
                tg.start_soon(ctx.submit, blocked)
                await anyio.sleep(0.05)
                with pytest.raises(QueueFull):
                    await ctx.submit(blocked)
                gate.set()
            with pytest.raises(ValueError, match="boom"):
                await ctx.submit(boom)
        u = ctx.usage()
        assert (u.tasks, u.failed, u.cancelled, u.expired, u.queue_full) == (4, 1, 1, 1, 1)
        samples = parse(render(rt).decode())
        lab = ctx_labels(ctx)
        counted = {
            outcome: value(samples, "pygpukit_tasks_total", **lab, outcome=outcome)
            for outcome in ("ok", "failed", "cancelled", "deadline_exceeded", "queue_full")
        }
        assert counted == {
            "ok": 3,
            "failed": 1,
            "cancelled": 1,
            "deadline_exceeded": 1,
            "queue_full": 1,
        }
        # the tasks that waited behind the blocked one waited about as long as it ran
        waits = value(samples, "pygpukit_task_queue_wait_seconds_count", **lab)
        assert waits == 4
        assert value(samples, "pygpukit_task_queue_wait_seconds_sum", **lab) >= 0.05


async def test_evictions_refusals_and_rejections_are_counted() -> None:
    with Runtime(backend="host", vram_limit=64 * MiB) as rt:
        batch = rt.create_context("batch", 48 * MiB, qos=QoSPolicy.BEST_EFFORT)
        async with context_session(batch):
            handle = batch.evictable(rt.xp.ones(4 * MiB))  # 32 MiB of float64
            with pytest.raises(VRAMBudgetExceeded):
                rt.xp.ones(4 * MiB)  # over its 48 MiB
        guaranteed = rt.create_context("g", 48 * MiB, qos=QoSPolicy.GUARANTEED)  # evicts it
        with pytest.raises(AdmissionRejected):
            rt.create_context("g2", 48 * MiB, qos=QoSPolicy.GUARANTEED)
        rt.destroy_context(guaranteed)
        async with context_session(batch):
            assert float(handle.array.sum()) == 4 * MiB  # restored
        samples = parse(render(rt).decode())
        lab = ctx_labels(batch)
        assert value(samples, "pygpukit_evictions_total", **lab) == 1
        assert value(samples, "pygpukit_evicted_bytes_total", **lab) == 32 * MiB
        assert value(samples, "pygpukit_restores_total", **lab) == 1
        assert value(samples, "pygpukit_budget_refusals_total", **lab) == 1
        assert value(samples, "pygpukit_reservation_rejections_total", device="0") == 1
        u = batch.usage()
        assert (u.evictions, u.evicted_bytes, u.restores, u.refusals) == (1, 32 * MiB, 1, 1)


class _In(BaseModel):
    x: int


class _Out(BaseModel):
    y: int


@stage("metrics_double", context="metrics-stage")
async def _double(inp: _In) -> _Out:
    if inp.x < 0:
        raise ValueError("negative")
    await anyio.sleep(0.01)
    return _Out(y=2 * inp.x)


async def test_pipeline_runs_are_counted_by_outcome_and_stages_timed() -> None:
    with Runtime(backend="host") as rt:
        rt.create_context("metrics-stage", 4 * MiB)
        pipe = Pipeline.chain("metrics-pipe", _double, runtime=rt).build()
        name = "metrics-pipe"
        before = parse(render(rt).decode())
        for x in (1, 2):
            await pipe.run({"x": x})
        with pytest.raises(ValueError, match="negative"):
            await pipe.run({"x": -1})
        with pytest.raises(DeadlineExceeded):
            await pipe.run({"x": 1}, deadline=time.monotonic() - 1)
        after = parse(render(rt).decode())

        def delta(metric: str, **labels: str) -> float:
            return value(after, metric, **labels) - value(before, metric, **labels)

        runs = "pygpukit_pipeline_runs_total"
        assert delta(runs, pipeline=name, outcome="ok") == 2
        assert delta(runs, pipeline=name, outcome="failed") == 1
        assert delta(runs, pipeline=name, outcome="deadline_exceeded") == 1
        stage_s = "pygpukit_pipeline_stage_seconds"
        assert delta(f"{stage_s}_count", pipeline=name, stage="metrics_double") == 2
        assert delta(f"{stage_s}_sum", pipeline=name, stage="metrics_double") >= 0.02
        # none of the two took 1 ms: both in the buckets above it
        assert delta(f"{stage_s}_bucket", pipeline=name, stage="metrics_double", le="0.001") == 0


async def test_a_scrape_of_50_contexts_takes_at_most_5_ms() -> None:
    with Runtime(backend="host") as rt:
        contexts = [rt.create_context(f"m{i}", MiB, qos=list(QoSPolicy)[i % 3]) for i in range(50)]
        async with anyio.create_task_group() as tg:
            for ctx in contexts:
                for _ in range(4):
                    tg.start_soon(ctx.submit, lambda: None)
        render(rt)  # warm
        took = []
        for _ in range(21):
            t0 = time.perf_counter()
            text = render(rt)
            took.append(time.perf_counter() - t0)
        samples = parse(text.decode())
        assert sum(1 for name, _ in samples if name == "pygpukit_tasks_queued") == 50
        assert statistics.median(took) <= 0.005, f"median scrape {statistics.median(took):.4f} s"


async def test_the_collector_gives_prometheus_client_the_same_samples() -> None:
    with Runtime(backend="host") as rt:
        ctx = rt.create_context("collected", MiB)
        await ctx.submit(lambda: None)
        registry = prometheus_client.CollectorRegistry()
        registry.register(PygpukitCollector(rt))
        ours = parse(render(rt).decode())
        theirs = parse(prometheus_client.generate_latest(registry).decode())
        assert ours == theirs
        assert value(theirs, "pygpukit_tasks_total", **ctx_labels(ctx), outcome="ok") == 1


def test_the_standalone_server_serves_metrics_on_loopback() -> None:
    with Runtime(backend="host") as rt:
        rt.create_context("served", MiB)
        server = start_metrics_server(0, rt)
        try:
            host, port = server.server_address[:2]
            assert host == "127.0.0.1"
            with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
                assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                samples = parse(r.read().decode())
            assert ("pygpukit_context_memory_budget_bytes", frozenset()) not in samples
            budget = [v for (n, lab), v in samples.items() if n.endswith("budget_bytes")]
            assert budget == [MiB]
            with pytest.raises(urllib.error.HTTPError) as missing:
                urllib.request.urlopen(f"http://{host}:{port}/other", timeout=10)
            assert missing.value.code == 404
            missing.value.close()
        finally:
            server.shutdown()
            server.server_close()


def test_bad_arguments_are_refused_clearly() -> None:
    from pygpukit import InvalidArgument, InvalidArgumentType

    with Runtime(backend="host") as rt:
        with pytest.raises(InvalidArgument, match="port must be an int from 0 to 65535"):
            start_metrics_server(70000, rt)
        with pytest.raises(InvalidArgumentType, match="a Runtime or a callable"):
            start_metrics_server(0, "rt")  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentType, match="a Runtime or a callable"):
            PygpukitCollector(3)  # type: ignore[arg-type]


def test_a_closed_runtime_reports_no_context_metrics() -> None:
    rt = Runtime(backend="host")
    rt.create_context("gone", MiB)
    rt.close()
    text = render(rt).decode()
    assert "# TYPE pygpukit_pipeline_runs counter" in text  # the process's pipelines stay
    names = {name for name, _ in parse(text)}
    assert not {n for n in names if n.startswith(("pygpukit_context_", "pygpukit_device_"))}


async def test_the_grafana_dashboard_names_only_metrics_we_export() -> None:
    import json
    import re

    from pygpukit.integrations._admission import Admission, AdmissionConfig

    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    named = {m for e in exprs for m in re.findall(r"\bpygpukit_[a-z_]+", e)}
    with Runtime(backend="host") as rt:
        rt.create_context("metrics-stage", 4 * MiB)
        await Pipeline.chain("dash-pipe", _double, runtime=rt).build().run({"x": 1})
        admissions = {"dash-pipe": Admission("dash-pipe", AdmissionConfig())}
        exported = {name for name, _ in parse(render(rt, admissions).decode())}
    assert len(named) >= 15
    assert named <= exported, f"the dashboard queries metrics nobody exports: {named - exported}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_a_metrics_path_must_be_a_path_and_none_mounts_nothing() -> None:
    from fastapi import FastAPI

    from pygpukit import InvalidArgument
    from pygpukit.integrations.fastapi import Pygpukit

    with pytest.raises(
        InvalidArgument,
        match=r"^metrics_path must start with '/', not 'metrics'; e\.g\. '/metrics', or None "
        r"to mount no metrics endpoint$",
    ):
        Pygpukit(backend="host").install(FastAPI(), metrics_path="metrics")
    app = FastAPI()
    Pygpukit(backend="host").install(app, metrics_path=None)
    assert "/metrics" not in {getattr(r, "path", None) for r in app.routes}
    app = FastAPI()
    Pygpukit(backend="host").install(app, metrics_path="/stats/prometheus")
    assert "/stats/prometheus" in {getattr(r, "path", None) for r in app.routes}
