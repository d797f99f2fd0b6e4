"""FastAPI integration: a lifespan that starts and drains the runtime, dependencies that
hand out contexts and pipelines, error mapping, and streaming responses.

Needs ``pip install 'pygpukit[server]'``. Usage::

    gpu = Pygpukit(setup=make_contexts_and_pipelines)
    app = FastAPI(lifespan=gpu.lifespan)
    gpu.install(app)

    @app.post("/chat")
    async def chat(req: ChatIn, assistant=Depends(gpu.pipeline("assistant"))):
        return (await assistant.run(req)).output

Errors map to HTTP as clients need them: ``QueueFull`` → 429 (with ``Retry-After``),
``DeadlineExceeded`` → 504, ``VRAMBudgetExceeded`` / ``AdmissionRejected`` /
``ContextClosed`` → 503, ``PipelineValidationError``, ``InvalidArgument``,
``InvalidArgumentType`` and pydantic validation errors → 422, ``CudaError`` → 500; every
body is ``{"error": <type>, "detail": <message>}``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "pygpukit.integrations.fastapi needs FastAPI; install it with "
        "pip install 'pygpukit[server]'"
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
from ..runtime import ExecutionContext, Runtime

__all__ = ("STATUS", "Pygpukit", "error_response", "ndjson")

STATUS: dict[type[BaseException], int] = {
    QueueFull: 429,
    DeadlineExceeded: 504,
    VRAMBudgetExceeded: 503,
    AdmissionRejected: 503,
    ContextClosed: 503,
    PipelineValidationError: 422,
    InvalidArgument: 422,
    InvalidArgumentType: 422,
    CudaError: 500,
}


def error_response(exc: BaseException) -> JSONResponse:
    """The JSON response for a pygpukit error (500 for anything unmapped)."""
    status = next((code for kind, code in STATUS.items() if isinstance(exc, kind)), 500)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(
        {"error": type(exc).__name__, "detail": str(exc)}, status_code=status, headers=headers
    )


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
        except PygpukitError as exc:
            yield (json.dumps({"error": type(exc).__name__, "detail": str(exc)}) + "\n").encode()

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
        try:
            await self.app(scope, receive, send)
        finally:
            self.owner._request_done()


class Pygpukit:
    """Owns the runtime for one FastAPI app.

    :param setup: ``setup(runtime)`` (sync or async) run at startup: create contexts, build
        pipelines; a dict it returns is merged into :attr:`pipelines`
    :param drain_timeout: seconds shutdown waits for requests in flight before closing
    :param runtime_kwargs: passed to :class:`~pygpukit.runtime.Runtime`
    """

    def __init__(
        self,
        setup: Callable[[Runtime], Any] | None = None,
        *,
        drain_timeout: float = 10.0,
        **runtime_kwargs: Any,
    ) -> None:
        self._setup = setup
        self._runtime_kwargs = runtime_kwargs
        self._runtime: Runtime | None = None
        self.pipelines: dict[str, Any] = {}
        self.drain_timeout = drain_timeout
        self.in_flight = 0
        self._idle: anyio.Event | None = None

    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            raise ContextClosed("<runtime>")
        return self._runtime

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Start the runtime (and run ``setup``); on shutdown, drain and close it."""
        self._runtime = Runtime(**self._runtime_kwargs)
        try:
            if self._setup is not None:
                made = self._setup(self._runtime)
                if isinstance(made, Awaitable):
                    made = await made
                if isinstance(made, dict):
                    self.pipelines.update(made)
            app.state.pygpukit = self
            yield
            with anyio.move_on_after(self.drain_timeout):
                while self.in_flight:
                    self._idle = anyio.Event()
                    await self._idle.wait()
        finally:
            rt, self._runtime = self._runtime, None
            rt.close()

    def install(self, app: FastAPI) -> None:
        """Add the error handlers and the in-flight counter used to drain on shutdown."""

        async def handle(request: Request, exc: Exception) -> JSONResponse:
            return error_response(exc)

        app.add_exception_handler(PygpukitError, handle)
        app.add_middleware(_InFlight, owner=self)

    def _request_done(self) -> None:
        self.in_flight -= 1
        if not self.in_flight and self._idle is not None:
            self._idle.set()

    # -- dependencies ---------------------------------------------------------------------
    def context(self, name: str) -> Callable[[], ExecutionContext]:
        """A dependency giving the context called ``name``."""

        def dependency() -> ExecutionContext:
            return self.runtime.get_context(name)

        return dependency

    def pipeline(self, name: str) -> Callable[[], Any]:
        """A dependency giving the pipeline registered as ``name`` by ``setup``."""

        def dependency() -> Any:
            try:
                return self.pipelines[name]
            except KeyError:
                raise InvalidArgument(
                    f"no pipeline named {name!r}; setup() returned {sorted(self.pipelines)}"
                ) from None

        return dependency
