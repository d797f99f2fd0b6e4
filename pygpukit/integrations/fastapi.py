"""FastAPI integration: a lifespan that starts and drains the runtime, dependencies that
hand out contexts and pipelines (behind an admission per pipeline), error mapping, and
streaming responses.

Needs the ``server`` extra: ``pip install 'pygpukit-async[server]'``. Usage::

    gpu = Pygpukit(setup=make_contexts_and_pipelines)
    app = FastAPI(lifespan=gpu.lifespan)
    gpu.install(app)

    @app.post("/chat")
    async def chat(req: ChatIn, assistant=Depends(gpu.pipeline("assistant"))):
        return (await assistant.run(req, deadline=time.monotonic() + 5)).output

Every error body is ``{"error": <type>, "detail": <message>}``. pygpukit's errors map to
HTTP as clients need them: ``QueueFull`` (and :class:`Overloaded`, the admission's refusal)
→ 429 with ``Retry-After``, ``DeadlineExceeded`` → 504, ``VRAMBudgetExceeded`` /
``AdmissionRejected`` / ``ContextClosed`` → 503 with ``Retry-After``, ``CudaError`` → 503
without it (the device failed: retrying this process is useless, it must be restarted; the
detail says so), ``PipelineValidationError``, ``InvalidArgument`` and
``InvalidArgumentType`` → 422. An exception group maps as its first error when all its
errors are pygpukit's. A request FastAPI cannot validate (a wrong type, malformed JSON, a
string with a lone surrogate) answers 422 with the errors listed under ``"errors"`` too; an
``HTTPException`` keeps its status; anything else is a 500 whose body tells nothing of the
server (the error is logged).

Dependencies are checked when the app starts: one naming a context or pipeline that
``setup`` did not create stops the startup (a misconfigured server must not blame its
clients with 422s).

``GET /metrics`` (mounted by :meth:`Pygpukit.install`) answers Prometheus metrics read from
the runtime when scraped (:mod:`pygpukit.observe.metrics`). A request carrying a W3C
``traceparent`` header continues that trace in its pipeline runs' and tasks' spans, once
spans are on (:func:`pygpukit.observe.instrument`).

``GET /health`` (mounted by :meth:`Pygpukit.install`) answers 200 ``{"status": "ok", ...}``
while the runtime runs work, and 503 ``{"status": "unhealthy", "error", "detail"}`` once its
device faulted (a CUDA context never recovers: point a Kubernetes liveness probe at it and
the process is restarted), while shutdown drains, and when the runtime is not running. It
reads state only, asking the device nothing. Once the device faulted, the dependencies
refuse new requests with the same 503 ``CudaError``, without touching the device.
"""

from __future__ import annotations

import http
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "pygpukit.integrations.fastapi needs FastAPI; install it with "
        "pip install 'pygpukit-async[server]'"
    ) from exc

import anyio

from .._exceptions import (
    AdmissionRejected,
    ContextClosed,
    CudaError,
    DeadlineExceeded,
    InvalidArgument,
    InvalidArgumentType,
    PipelineValidationError,
    PygpukitError,
    QueueFull,
    VRAMBudgetExceeded,
)
from ..observe.metrics import CONTENT_TYPE, render
from ..observe.otel import attach_remote_parent, detach
from ..pipeline import Pipeline
from ..runtime import ExecutionContext, HealthState, Runtime
from ..runtime.checks import check_name
from . import _admission
from ._admission import Admission as Admission
from ._admission import AdmissionConfig as AdmissionConfig
from ._admission import AdmissionStatistics as AdmissionStatistics
from ._admission import AdmittedPipeline as AdmittedPipeline
from ._admission import AdmittedStream as AdmittedStream
from ._admission import Overloaded as Overloaded
from ._admission import RunOptions as RunOptions
from ._admission import Slot as Slot

__all__ = ("STATUS", "Pygpukit", "error_response", "ndjson", *_admission.__all__)

STATUS: dict[type[BaseException], int] = {
    QueueFull: 429,
    DeadlineExceeded: 504,
    VRAMBudgetExceeded: 503,
    AdmissionRejected: 503,
    ContextClosed: 503,
    PipelineValidationError: 422,
    InvalidArgument: 422,
    InvalidArgumentType: 422,
    CudaError: 503,
}


class _JSON(JSONResponse):
    """A JSON response in ASCII: text the client sent (a lone surrogate, say) that an error
    message repeats must not make the error response itself fail to encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _body(error: str, detail: Any, status: int, headers: Any = None, **more: Any) -> JSONResponse:
    return _JSON({"error": error, "detail": detail, **more}, status_code=status, headers=headers)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            yield from _leaves(sub)
    else:
        yield exc


def _answerable(exc: BaseException) -> BaseException:
    """The error to answer for ``exc``: itself; for an exception group whose errors are all
    pygpukit's (cancellations aside), the first of them; any other group stays itself."""
    if not isinstance(exc, BaseExceptionGroup):
        return exc
    # cancellations (asyncio's and trio's) are the BaseExceptions that are no Exception
    errors = [e for e in _leaves(exc) if isinstance(e, Exception)]
    if errors and all(isinstance(e, PygpukitError) for e in errors):
        return errors[0]
    return exc


_RESTART = "the device failed and this server process must be restarted"


def _detail(exc: BaseException) -> str:
    if isinstance(exc, CudaError):  # a faulted CUDA context never recovers
        return f"{_RESTART}: {exc}"
    return str(exc)


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON response for a pygpukit error, or for an exception group of them (500 for
    anything unmapped)."""
    exc = _answerable(exc)
    status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
    headers = None
    if status in (429, 503) and not isinstance(exc, CudaError):  # no retry helps a fault
        retry = getattr(exc, "retry_after_s", 1.0)
        headers = {"Retry-After": str(max(1, math.ceil(retry)))}
    return _body(type(exc).__name__, _detail(exc), status, headers)


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    errors = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
        for e in exc.errors()
    ]  # the input itself is not repeated: it may be huge, or not encodable
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
    return _body("RequestValidationError", detail, 422, errors=errors)


def _http_response(exc: HTTPException) -> JSONResponse:
    try:
        error = http.HTTPStatus(exc.status_code).phrase.replace(" ", "")
    except ValueError:
        error = "HTTPException"
    return _body(error, exc.detail, exc.status_code, getattr(exc, "headers", None))


_ADMISSION = AdmissionConfig()
_INTERNAL = "the server failed to handle this request; its log has the details"


def _jsonable(item: Any) -> Any:
    if hasattr(item, "model_dump"):
        return item.model_dump(mode="json")
    if hasattr(item, "__cuda_array_interface__"):  # CuPy: copy to the host first
        return item.get().tolist()
    if hasattr(item, "tolist"):  # NumPy
        return item.tolist()
    return item


def ndjson(items: AsyncIterator[Any]) -> StreamingResponse:
    """Stream ``items`` (pydantic models, arrays, JSON-able values) as JSON lines, each sent
    as soon as it is produced. A pygpukit error mid-stream ends the stream with an error line.
    """

    async def body() -> AsyncIterator[bytes]:
        try:
            async for item in items:
                yield (json.dumps(_jsonable(item)) + "\n").encode()
        except Exception as exc:
            error = _answerable(exc)
            if not isinstance(error, PygpukitError):
                raise
            line = {"error": type(error).__name__, "detail": _detail(error)}
            yield (json.dumps(line) + "\n").encode()

    return StreamingResponse(body(), media_type="application/x-ndjson")


class _InFlight:
    """Counts requests until their last body byte is sent (streaming responses included),
    so that shutdown drains them; a plain ASGI middleware, since Starlette's
    ``@app.middleware("http")`` returns as soon as the headers are out."""

    def __init__(self, app: Any, owner: Pygpukit) -> None:
        self.app = app
        self.owner = owner

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.owner.in_flight += 1
        trace = None
        try:
            # a caller's trace continues into the request's pipeline runs and tasks (when
            # instrumented: pygpukit.observe.instrument)
            trace = attach_remote_parent(scope.get("headers") or [])
            await self.app(scope, receive, send)
        finally:
            if trace is not None:
                detach(trace)
            self.owner._request_done()


class Pygpukit:
    """Owns the runtime for one FastAPI app.

    :param setup: ``setup(runtime)`` (sync or async) run at startup: create contexts, build
        pipelines; a dict it returns is merged into :attr:`pipelines`
    :param drain_timeout: seconds shutdown waits for requests in flight before closing
    :param admission: how much of each pipeline runs at once (:class:`AdmissionConfig`);
        ``None`` admits every request at once
    :param runtime_kwargs: passed to :class:`~pygpukit.runtime.Runtime`
    """

    def __init__(
        self,
        setup: Callable[[Runtime], Any] | None = None,
        *,
        drain_timeout: float = 10.0,
        admission: AdmissionConfig | None = _ADMISSION,
        **runtime_kwargs: Any,
    ) -> None:
        if admission is not None and not isinstance(admission, AdmissionConfig):
            raise InvalidArgumentType(
                f"admission must be an AdmissionConfig or None, not {admission!r}"
            )
        self._setup = setup
        self._runtime_kwargs = runtime_kwargs
        self._runtime: Runtime | None = None
        self.pipelines: dict[str, Any] = {}
        #: per pipeline name, once a request asked for it
        self.admissions: dict[str, Admission] = {}
        self.admission = admission
        self.drain_timeout = drain_timeout
        self.in_flight = 0
        #: set once shutdown began: requests in flight finish, ``/health`` answers 503
        self.draining = False
        self._answered_fault: BaseException | None = None  # a CudaError a request got
        self._idle: anyio.Event | None = None
        self._wanted: dict[str, set[str]] = {"context": set(), "pipeline": set()}

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise ContextClosed("<runtime>")
        return self._runtime

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Start the runtime (and run ``setup``); on shutdown, drain and close it.

        :raises InvalidArgument: a dependency names a context or pipeline that ``setup``
            did not create (the app does not start)
        """
        self._runtime = Runtime(**self._runtime_kwargs)
        self.draining = False
        self._answered_fault = None
        try:
            if self._setup is not None:
                made = self._setup(self._runtime)
                if isinstance(made, Awaitable):
                    made = await made
                if isinstance(made, dict):
                    self.pipelines.update(made)
            self._check_wanted()
            app.state.pygpukit = self
            yield
            self.draining = True
            with anyio.move_on_after(self.drain_timeout):
                while self.in_flight:
                    self._idle = anyio.Event()
                    await self._idle.wait()
        finally:
            rt, self._runtime = self._runtime, None
            rt.close()

    def _check_wanted(self) -> None:
        contexts = {c.name for c in self.runtime.contexts}
        missing = [
            f"{kind} {name!r}"
            for kind, have in (("context", contexts), ("pipeline", set(self.pipelines)))
            for name in sorted(self._wanted[kind] - have)
        ]
        if missing:
            raise InvalidArgument(
                f"the app's dependencies name {', '.join(missing)}, which setup() did not "
                f"create (it made contexts {sorted(contexts)} and pipelines "
                f"{sorted(self.pipelines)}); create them in setup() or fix the names"
            )

    def install(
        self,
        app: FastAPI,
        *,
        health_path: str | None = "/health",
        metrics_path: str | None = "/metrics",
    ) -> None:
        """Add the error handlers (every error body ``{"error", "detail"}``), the in-flight
        counter used to drain on shutdown, and the health and metrics endpoints.

        :param health_path: where ``GET`` answers :meth:`health_response`; ``None`` mounts
            nothing
        :param metrics_path: where ``GET`` answers the Prometheus metrics of the runtime,
            the pipelines and their admissions (:meth:`metrics_response`); ``None`` mounts
            nothing
        :raises InvalidArgument: a path does not start with ``/``
        """
        for what, path in (("health", health_path), ("metrics", metrics_path)):
            if path is not None:
                check_name(path, f"{what}_path")
                if not path.startswith("/"):
                    raise InvalidArgument(
                        f"{what}_path must start with '/', not {path!r}; e.g. '/{what}', "
                        f"or None to mount no {what} endpoint"
                    )

        async def pygpukit_error(request: Request, exc: Exception) -> JSONResponse:
            return self._answer(exc)

        async def group(request: Request, exc: Exception) -> JSONResponse:
            if _answerable(exc) is exc:
                raise exc  # not only pygpukit's errors: a server error, logged
            return self._answer(exc)

        async def invalid(request: Request, exc: Exception) -> JSONResponse:
            assert isinstance(exc, RequestValidationError)
            return _validation_response(exc)

        async def http_error(request: Request, exc: Exception) -> JSONResponse:
            assert isinstance(exc, HTTPException)
            return _http_response(exc)

        async def internal(request: Request, exc: Exception) -> JSONResponse:
            # Starlette re-raises the error after this answer, so the server logs it
            return _body("InternalServerError", _INTERNAL, 500)

        app.add_exception_handler(PygpukitError, pygpukit_error)
        app.add_exception_handler(ExceptionGroup, group)
        app.add_exception_handler(RequestValidationError, invalid)
        app.add_exception_handler(HTTPException, http_error)
        app.add_exception_handler(Exception, internal)
        app.add_middleware(_InFlight, owner=self)
        if health_path is not None:

            async def health() -> JSONResponse:  # async: no worker thread per probe
                return self.health_response()

            app.add_api_route(health_path, health, methods=["GET"], include_in_schema=False)
        if metrics_path is not None:

            async def metrics() -> Response:  # quick (a few ms): read on the loop
                return self.metrics_response()

            app.add_api_route(metrics_path, metrics, methods=["GET"], include_in_schema=False)

    def metrics_response(self) -> Response:
        """What ``GET /metrics`` answers: the Prometheus text of the runtime's contexts and
        device, every pipeline's runs and this server's admissions
        (:mod:`pygpukit.observe.metrics`)."""
        return Response(render(self._runtime, self.admissions), media_type=CONTENT_TYPE)

    def _answer(self, exc: Exception) -> JSONResponse:
        error = _answerable(exc)
        if isinstance(error, CudaError) and self._answered_fault is None:
            # the client is told to restart the process, so /health must say so too, even
            # where the runtime has not seen the fault (work nothing awaited fails at launch);
            # a copy, which holds none of the request's frames
            self._answered_fault = CudaError(str(error), status=error.status)
        return error_response(exc)

    def fault(self) -> BaseException | None:
        """The device error that makes this server unusable until it is restarted: the fault
        :meth:`Runtime.health` reports, or a ``CudaError`` a request was answered with;
        ``None`` if there is none. Reads state only."""
        rt = self._runtime
        health = None if rt is None else rt.health()
        if health is not None and health.state is HealthState.FAULTED:
            return health.error
        return self._answered_fault

    def health_response(self) -> JSONResponse:
        """What ``GET /health`` answers: 200 ``{"status": "ok", "backend", "device",
        "contexts"}`` while the runtime runs work; 503 ``{"status": "unhealthy", "error",
        "detail"}`` once its device faulted (``error`` is the fault's type: the process must
        be restarted), while shutdown drains (``"Draining"``), and while the runtime is not
        running (``"ContextClosed"``). It reads state only, asking the device nothing."""
        fault = self.fault()
        rt = self._runtime
        if fault is not None:
            error, detail = type(fault).__name__, f"{_RESTART}: {fault}"
        elif rt is None or not rt.health().ok:
            error, detail = "ContextClosed", "the runtime is not running"
        elif self.draining:
            error, detail = (
                "Draining",
                "shutting down: finishing the requests in flight, taking no more",
            )
        else:
            body = {
                "status": "ok",
                "backend": rt.backend.name,
                "device": rt.device.name,
                "contexts": len(rt.contexts),
            }
            return _JSON(body)
        return _JSON({"status": "unhealthy", "error": error, "detail": detail}, status_code=503)

    def _check_usable(self) -> None:
        """Refuse a request at once when the device faulted: its work could only fail."""
        fault = self.fault()
        if fault is not None:
            raise CudaError(str(fault), status=getattr(fault, "status", None))

    def _request_done(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._idle is not None:
            self._idle.set()

    # -- dependencies ---------------------------------------------------------------------
    def _want(self, kind: str, name: str) -> None:
        check_name(name, f"{kind} name")
        self._wanted[kind].add(name)
        if self._runtime is not None:  # asked for after startup: check it now
            self._check_wanted()

    def context(self, name: str) -> Callable[[], Awaitable[ExecutionContext]]:
        """A dependency giving the context called ``name``, which ``setup`` must create.

        :raises ContextClosed: at request time: the context was destroyed since (503)
        :raises CudaError: at request time: the device faulted (503; see :meth:`fault`)
        """
        self._want("context", name)

        # async: FastAPI would run a plain function on a worker thread, per request
        async def dependency() -> ExecutionContext:
            self._check_usable()
            try:
                return self.runtime.get_context(name)
            except InvalidArgument:  # it existed at startup: destroyed since
                raise ContextClosed(name) from None

        return dependency

    def pipeline(self, name: str) -> Callable[[], Awaitable[Any]]:
        """A dependency giving the pipeline ``setup`` registered as ``name``, behind its
        admission: an :class:`AdmittedPipeline` (with ``admission=None``, one that admits
        every request at once).

        :raises CudaError: at request time: the device faulted (503; see :meth:`fault`)
        """
        self._want("pipeline", name)

        async def dependency() -> Any:
            return self.get_pipeline(name)

        return dependency

    def get_pipeline(self, name: str) -> Any:
        """The pipeline registered as ``name``, behind its admission: for routes that pick
        the pipeline at request time.

        :raises LookupError: no pipeline has that name (a server error: check the name
            before calling)
        :raises CudaError: the device faulted (503; see :meth:`fault`)
        """
        self._check_usable()
        try:
            pipeline = self.pipelines[name]
        except KeyError:
            raise LookupError(
                f"no pipeline named {name!r}; setup() returned {sorted(self.pipelines)}"
            ) from None
        if not isinstance(pipeline, Pipeline):
            return pipeline
        admission = self.admissions.get(name)
        if admission is None and self.admission is not None:
            admission = self.admissions[name] = Admission(name, self.admission)
        return AdmittedPipeline(pipeline, admission)


for _name in _admission.__all__:
    globals()[_name].__module__ = __name__  # tracebacks and reprs name the public module
del _name
