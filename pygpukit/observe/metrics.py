"""Prometheus metrics, read from the runtime's live state when scraped.

::

    text = render(rt)                          # the exposition text, bytes
    start_metrics_server(9400, rt)             # http://127.0.0.1:9400/metrics
    REGISTRY.register(PygpukitCollector(rt))   # into prometheus-client's registry
    # FastAPI: Pygpukit.install(app) mounts GET /metrics

Nothing is counted for the metrics' sake on the hot paths: a scrape reads the counters and
histograms the runtime keeps anyway (each context's usage and task histograms, each
pipeline name's run statistics, the server's admissions). Its cost grows with the contexts
and pipelines, not with the work done.

The text is written here, not by prometheus-client's ``generate_latest``: with 50 contexts
(some 3,400 samples) the library took 41 ms a scrape, our writer takes a tenth of that
(docs/adr/0039) — and a scrape holds the GIL, so the event loop waits for it.
:class:`PygpukitCollector` hands the same families to a prometheus-client registry (the
``metrics`` extra) for applications that export their own metrics too, at the library's
cost.

Labels: ``context``, ``tier``, ``device``, ``partition`` (``""`` for none) on every
per-context metric; ``pipeline`` and ``stage`` on pipeline metrics; ``outcome`` on the
counters of how tasks and runs ended. Each value is a name the application chose
(contexts, pipelines, stages), so the label sets are bounded by what it creates. A
destroyed context's series end with it.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Protocol

from .._exceptions import InvalidArgument, InvalidArgumentType
from .._stats import Histogram
from .._telemetry import OUTCOMES
from ..pipeline import pipeline_statistics
from ..runtime import HealthState, Runtime


class Admission(Protocol):
    """What the metrics read of a server's admission (the FastAPI integration's
    ``Admission``): ``statistics()`` with ``limit``, ``running``, ``waiting``,
    ``admitted`` and ``refused``."""

    def statistics(self) -> Any: ...


__all__ = (
    "CONTENT_TYPE",
    "OUTCOMES",
    "Family",
    "PygpukitCollector",
    "families",
    "render",
    "start_metrics_server",
)

#: the exposition format :func:`render` writes
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


_CTX = ("context", "tier", "device", "partition")

RuntimeSource = Runtime | Callable[[], Runtime | None]
AdmissionSource = Callable[[], Mapping[str, Admission]]
Buckets = list[tuple[float, int]]


@dataclass
class Family:
    """One metric: its samples as label values → value, or → (buckets, sum) for a
    histogram. A counter's ``name`` lacks the ``_total`` its samples carry."""

    name: str
    kind: str  # "gauge", "counter" or "histogram"
    help: str
    labels: tuple[str, ...]
    values: list[tuple[tuple[str, ...], float]] = field(default_factory=list)
    #: label values, upper bounds (``inf`` last), cumulative counts, sum
    hists: list[tuple[tuple[str, ...], tuple[float, ...], list[int], float]] = field(
        default_factory=list
    )

    def add(self, labels: tuple[str, ...], value: float) -> None:
        self.values.append((labels, value))

    def add_histogram(self, labels: tuple[str, ...], buckets: Buckets, total: float) -> None:
        bounds = tuple(b for b, _ in buckets)
        self.hists.append((labels, bounds, [n for _, n in buckets], total))


def families(
    runtime: Runtime | None, admissions: Mapping[str, Admission] | None = None
) -> list[Family]:
    """Every metric now: the runtime's (none for ``None`` or a closed runtime), every
    pipeline name's that ran in this process, and ``admissions``'s (the server's)."""
    out: list[Family] = []
    if runtime is not None and runtime.health().state is not HealthState.CLOSED:
        out += _runtime_families(runtime)
    out += _pipeline_families()
    if admissions is not None:
        out += _admission_families(admissions)
    return out


def _runtime_families(rt: Runtime) -> list[Family]:
    device = str(rt.device.device_id)
    memory = [
        (key, Family(f"pygpukit_context_memory_{name}_bytes", "gauge", doc, _CTX))
        for key, name, doc in (
            ("used", "used", "Bytes in live arrays and tensors allocated in the context"),
            ("held", "held", "Device bytes the context's pool holds (used + cached): charged"),
            ("peak", "peak", "The largest held so far"),
            ("max", "budget", "The context's budget, max_vram"),
            ("reserved", "reserved", "Bytes reserved for the context on the device"),
            ("available", "available", "Bytes the context could still get now"),
        )
    ]
    queued = Family("pygpukit_tasks_queued", "gauge", "Tasks waiting to launch", _CTX)
    in_flight = Family(
        "pygpukit_tasks_in_flight", "gauge", "Tasks launched whose GPU work runs", _CTX
    )
    tasks = Family(
        "pygpukit_tasks", "counter", "submit() calls by how they ended", (*_CTX, "outcome")
    )
    counters = [
        (key, Family(name, "counter", doc, _CTX))
        for key, name, doc in (
            ("evictions", "pygpukit_evictions", "Buffers spilled to host memory"),
            ("evicted_bytes", "pygpukit_evicted_bytes", "Device bytes freed by spills"),
            ("restores", "pygpukit_restores", "Spilled buffers brought back"),
            ("refusals", "pygpukit_budget_refusals", "Allocations refused: VRAMBudgetExceeded"),
            ("sessions", "pygpukit_sessions", "Sessions entered"),
        )
    ]
    wait = Family(
        "pygpukit_task_queue_wait_seconds",
        "histogram",
        "Seconds a task waited from submit() to launch",
        _CTX,
    )
    gpu = Family("pygpukit_task_gpu_seconds", "histogram", "GPU seconds per finished task", _CTX)
    for ctx in rt.contexts:
        u = ctx.usage()
        labels = (ctx.name, ctx.qos.name, device, ctx.partition or "")
        for key, family in memory:
            family.add(labels, getattr(u, key))
        queued.add(labels, u.queued)
        in_flight.add(labels, u.in_flight)
        ended = (u.tasks - u.failed, u.failed, u.cancelled, u.expired, u.queue_full)
        for outcome, n in zip(OUTCOMES, ended, strict=True):
            tasks.add((*labels, outcome), n)
        for key, family in counters:
            family.add(labels, getattr(u, key))
        waited, ran = ctx.task_histograms()
        _add(wait, labels, waited)
        _add(gpu, labels, ran)
    out = [f for _, f in memory] + [queued, in_flight, tasks] + [f for _, f in counters]
    out += [wait, gpu]

    info = Family(
        "pygpukit_device_info",
        "gauge",
        "The device a runtime manages",
        ("device", "name", "backend"),
    )
    info.add((device, rt.device.name, rt.backend.name), 1)
    out.append(info)
    ledger = rt.ledger
    for name, doc, value in (
        ("managed", "Device bytes the runtime hands out (its vram_limit)", ledger.capacity),
        ("reserved", "Bytes reserved for contexts", ledger.reserved_total()),
        ("available", "Unreserved bytes not in use", rt.available_vram()),
    ):
        family = Family(f"pygpukit_device_memory_{name}_bytes", "gauge", doc, ("device",))
        family.add((device,), value)
        out.append(family)
    faults = Family(
        "pygpukit_device_faults",
        "counter",
        "Sticky device faults seen (the process must be restarted after one)",
        ("device",),
    )
    faults.add((device,), int(rt.health().state is HealthState.FAULTED))
    rejected = Family(
        "pygpukit_reservation_rejections",
        "counter",
        "Contexts refused at creation: their reservation did not fit (AdmissionRejected)",
        ("device",),
    )
    rejected.add((device,), ledger.rejections)
    stats = rt.bridge.stats()
    completions = Family(
        "pygpukit_completions",
        "counter",
        "GPU completions delivered to awaiting callers (the process's completion bridge)",
        (),
    )
    completions.add((), stats.armed - stats.pending)
    return [*out, faults, rejected, completions]


def _pipeline_families() -> list[Family]:
    runs = Family(
        "pygpukit_pipeline_runs",
        "counter",
        "Pipeline runs by how they ended",
        ("pipeline", "outcome"),
    )
    stage = Family(
        "pygpukit_pipeline_stage_seconds",
        "histogram",
        "Seconds from a stage's first call to its last call's end, in runs that succeeded",
        ("pipeline", "stage"),
    )
    first = Family(
        "pygpukit_pipeline_first_output_seconds",
        "histogram",
        "Seconds from a run's start to its first output item",
        ("pipeline",),
    )
    whole = Family(
        "pygpukit_pipeline_run_seconds", "histogram", "Seconds a successful run took", ("pipeline",)
    )
    for name, s in sorted(pipeline_statistics().items()):
        for outcome in OUTCOMES:
            runs.add((name, outcome), s.runs.get(outcome, 0))
        for stage_id, (buckets, total) in sorted(s.stage_s.items()):
            stage.add_histogram((name, stage_id), buckets, total)
        first.add_histogram((name,), *s.first_output_s)
        whole.add_histogram((name,), *s.elapsed_s)
    return [runs, stage, first, whole]


def _admission_families(admissions: Mapping[str, Admission]) -> list[Family]:
    labels = ("pipeline",)
    fams = {
        key: Family(name, kind, doc, labels)
        for key, name, kind, doc in (
            ("refused", "pygpukit_admission_rejections", "counter", "Requests refused (429)"),
            ("admitted", "pygpukit_admission_admitted", "counter", "Requests admitted"),
            ("running", "pygpukit_admission_running", "gauge", "Requests running now"),
            ("waiting", "pygpukit_admission_waiting", "gauge", "Requests waiting for admission"),
            ("limit", "pygpukit_admission_limit", "gauge", "Requests that may run at once now"),
        )
    }
    for name, admission in sorted(admissions.items()):
        s = admission.statistics()
        for key, family in fams.items():
            family.add((name,), getattr(s, key))
    return list(fams.values())


def _add(family: Family, labels: tuple[str, ...], hist: Histogram) -> None:
    family.hists.append((labels, hist.edges, list(accumulate(hist.counts)), hist.sum))


# -- the text exposition format (0.0.4) ---------------------------------------------------
def render(runtime: Runtime | None, admissions: Mapping[str, Admission] | None = None) -> bytes:
    """The metrics of :func:`families` in Prometheus's text exposition format."""
    return _text(families(runtime, admissions))


def _text(fams: list[Family]) -> bytes:
    out: list[str] = []
    put = out.append
    for f in fams:
        help_text = f.help.replace("\\", "\\\\").replace("\n", "\\n")
        put(f"# HELP {f.name} {help_text}\n# TYPE {f.name} {f.kind}\n")
        if f.kind == "histogram":
            for values, bounds, counts, total in f.hists:
                inner = _labels(f.labels, values)
                heads = _bucket_heads(f.name, inner, bounds)
                put("".join(map(str.__add__, heads, map(str, counts))))
                braces = f"{{{inner}}}" if inner else ""
                put(f"\n{f.name}_count{braces} {counts[-1]}\n{f.name}_sum{braces} {total!r}\n")
            continue
        name = f.name + "_total" if f.kind == "counter" else f.name
        for values, value in f.values:
            inner = _labels(f.labels, values)
            put(f"{name}{{{inner}}} {value}\n" if inner else f"{name} {value}\n")
    return "".join(out).encode()


# Label sets and bucket lines repeat from one scrape to the next: their text is kept (up to
# _KEEP of each, then all forgotten at once, so contexts made and destroyed cannot grow it).
_KEEP = 4096
_label_text: dict[tuple[tuple[str, ...], tuple[str, ...]], str] = {}
_bucket_text: dict[tuple[str, str, tuple[float, ...]], tuple[str, ...]] = {}


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    text = _label_text.get((names, values))
    if text is None:
        if len(_label_text) >= _KEEP:
            _label_text.clear()
        pairs = zip(names, values, strict=True)
        text = _label_text[(names, values)] = ",".join(f'{n}="{_escape(v)}"' for n, v in pairs)
    return text


def _bucket_heads(name: str, inner: str, bounds: tuple[float, ...]) -> tuple[str, ...]:
    """Each bucket line of one series up to its count; every line but the first starts
    with the newline that ends the one before."""
    heads = _bucket_text.get((name, inner, bounds))
    if heads is None:
        if len(_bucket_text) >= _KEEP:
            _bucket_text.clear()
        sep = "," if inner else ""
        heads = _bucket_text[(name, inner, bounds)] = tuple(
            ("" if i == 0 else "\n") + f'{name}_bucket{{{inner}{sep}le="{_le(b)}"}} '
            for i, b in enumerate(bounds)
        )
    return heads


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


# -- serving ------------------------------------------------------------------------------
def start_metrics_server(
    port: int, runtime: RuntimeSource, *, addr: str = "127.0.0.1"
) -> http.server.ThreadingHTTPServer:
    """Serve ``GET /metrics`` at ``http://addr:port`` from a daemon thread, for applications
    that are not FastAPI ones; ``server.shutdown()`` stops it (``port=0`` picks a free one:
    ``server.server_address``). ``addr`` is loopback by default: expose it deliberately."""
    if not isinstance(runtime, Runtime) and not callable(runtime):
        raise InvalidArgumentType(
            f"start_metrics_server() takes a Runtime or a callable returning one, not {runtime!r}"
        )
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InvalidArgument(f"port must be an int from 0 to 65535, not {port!r}")
    current = _source(runtime)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # the name http.server calls
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404, "only /metrics is served here")
                return
            body = render(current())
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
            pass

    server = http.server.ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="pygpukit-metrics", daemon=True).start()
    return server


def _source(runtime: RuntimeSource) -> Callable[[], Runtime | None]:
    if isinstance(runtime, Runtime):
        return lambda: runtime
    return runtime


# -- prometheus-client ---------------------------------------------------------------------
class PygpukitCollector:
    """The same metrics as a prometheus-client collector (the ``metrics`` extra), for an
    application that exports its own metrics too: ``REGISTRY.register(PygpukitCollector(rt))``.
    prometheus-client builds and writes the samples itself, at about ten times
    :func:`render`'s cost.

    :param runtime: the runtime, or a callable returning the current one (``None`` while
        none runs: only the pipelines' metrics are reported then)
    :param admissions: a callable returning a server's admissions by pipeline name
    """

    def __init__(self, runtime: RuntimeSource, admissions: AdmissionSource | None = None) -> None:
        if not isinstance(runtime, Runtime) and not callable(runtime):
            raise InvalidArgumentType(
                f"PygpukitCollector() takes a Runtime or a callable returning one, not {runtime!r}"
            )
        try:
            import prometheus_client  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "PygpukitCollector needs prometheus-client; install it with "
                "pip install 'pygpukit-async[metrics]'"
            ) from exc
        self._runtime = _source(runtime)
        self._admissions = admissions

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        kinds = {
            "gauge": GaugeMetricFamily,
            "counter": CounterMetricFamily,
            "histogram": HistogramMetricFamily,
        }
        admissions = None if self._admissions is None else self._admissions()
        for f in families(self._runtime(), admissions):
            metric = kinds[f.kind](f.name, f.help, labels=list(f.labels))
            for values, value in f.values:
                metric.add_metric(list(values), value)
            for values, bounds, counts, total in f.hists:
                buckets = [(_le(b), n) for b, n in zip(bounds, counts, strict=True)]
                metric.add_metric(list(values), buckets, sum_value=total)
            yield metric
