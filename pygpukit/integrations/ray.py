"""Ray Serve: deployments whose GPU share is an enforced pygpukit budget.

Needs the ``ray`` extra: ``pip install 'pygpukit-async[ray]'``. ::

    @serve.deployment(ray_actor_options={"num_gpus": 0.5})
    class Assistant(Replica):
        def setup(self, rt: Runtime) -> dict[str, Pipeline]:   # once per replica
            return {"assistant": build_assistant(rt, "assistant", QoSPolicy.GUARANTEED)}

    handle = serve.run(Assistant.bind())
    out = await handle.run.remote(
        "assistant", {"prompt": "hi"}, request_meta(tier="guaranteed", deadline=t)
    )

In Ray Serve a replica's ``num_gpus`` (or ``gpu_memory``) is a scheduling promise only:
replicas packed on one GPU can take each other's memory. Each :class:`Replica` owns one
pygpukit :class:`~pygpukit.runtime.Runtime` whose ``vram_share`` is the replica's GPU
fraction (or whose ``vram_limit`` is :attr:`Replica.gpu_memory`), so a replica that goes
over its share gets :class:`~pygpukit.VRAMBudgetExceeded` — through the handle too, where
Ray re-raises it as the same type — while its neighbours go on; the models inside one
replica keep their own budgets, tiers and queues.

- A request's tier, priority and deadline travel with it as a :class:`RequestMeta`: the
  deadline as the seconds left (``time.monotonic()`` is not comparable across processes),
  turned back into a deadline on the replica's clock.
- :class:`ModelPool` multiplexes models by memory: each model loads on demand into a
  BestEffort context of its own; when a load needs room, the models used longest ago are
  paged to host memory (:meth:`ExecutionContext.evict`), not dropped, and come back on their
  next request (:meth:`LoadedModel.session`). Under ``@serve.multiplexed`` (which routes a
  model's requests to the replicas that hold it), return ``await pool.get(model_id)`` from
  the multiplexed loader and enter ``loaded.session()`` on every request.
- :func:`remote_stage` makes a pipeline stage of a method of another deployment, typed by
  its input and output models, so pipelines spanning deployments are still checked when
  built.
- :meth:`Replica.record_autoscaling_stats` reports queue depth and wait per tier for a custom
  autoscaling policy, and :meth:`Replica.report_metrics` sets ``ray.serve.metrics`` gauges
  (called every few seconds once the replica serves).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict
from typing import Any

try:
    import ray
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "pygpukit.integrations.ray needs Ray Serve; install it with "
        "pip install 'pygpukit-async[ray]'"
    ) from exc

import anyio
from pydantic import BaseModel, Field

from .._exceptions import InvalidArgument, InvalidArgumentType, VRAMBudgetExceeded
from .._stats import quantile
from ..pipeline import Pipeline, Stage, current_request, stage
from ..runtime import ExecutionContext, QoSPolicy, Runtime, context_session
from ..runtime.checks import check_bytes, check_name

__all__ = (
    "LoadedModel",
    "ModelPool",
    "Replica",
    "RequestMeta",
    "gpu_fraction",
    "remote_stage",
    "request_meta",
)

#: seconds between two reports of a replica's metrics to ``ray.serve.metrics``
METRICS_INTERVAL_S = 5.0


class RequestMeta(BaseModel):
    """A request's tier, priority and deadline, as they travel between processes.

    :ivar tier: a :class:`~pygpukit.QoSPolicy` name, or ``None``
    :ivar priority: lower runs first, as in ``ctx.submit``
    :ivar seconds_left: how long the request may still take, from when this was made
    """

    tier: str | None = None
    priority: int = 0
    seconds_left: float | None = Field(default=None)

    def deadline(self) -> float | None:
        """The deadline on this process's ``time.monotonic()`` clock."""
        return None if self.seconds_left is None else time.monotonic() + self.seconds_left

    @classmethod
    def current(cls) -> RequestMeta:
        """The request the calling pipeline stage serves (its tier, priority and deadline),
        to pass on to another deployment; an empty one outside a stage."""
        info = current_request()
        if info is None:
            return cls()
        return request_meta(
            tier=None if info.tier is None else info.tier.name,
            priority=info.priority,
            deadline=info.deadline,
        )


def request_meta(
    *, tier: QoSPolicy | str | None = None, priority: int = 0, deadline: float | None = None
) -> RequestMeta:
    """A :class:`RequestMeta` from a tier, a priority and a ``time.monotonic()`` deadline."""
    name = None if tier is None else QoSPolicy.coerce(tier).name
    left = None if deadline is None else deadline - time.monotonic()
    return RequestMeta(tier=name, priority=priority, seconds_left=left)


def gpu_fraction() -> float | None:
    """The share of one GPU Ray assigned to the calling replica (its ``num_gpus``, at most
    1: a replica of several GPUs has all of the one its runtime uses), or ``None`` outside
    Ray or without a GPU assigned."""
    if not ray.is_initialized():
        return None
    assigned = ray.get_runtime_context().get_assigned_resources()  # type: ignore[no-untyped-call]
    share = assigned.get("GPU")
    return min(1.0, float(share)) if share else None


class Replica:
    """Base of a Ray Serve deployment class whose replica owns one pygpukit runtime.

    Subclass it, decorate the subclass with ``@serve.deployment`` and override
    :meth:`setup`. Give the deployment a ``max_ongoing_requests`` of at least the requests
    it should order by tier: Serve's own queue in front of a replica is first come, first
    served, while inside the replica pygpukit's dispatcher runs a Guaranteed request's work
    ahead of BestEffort work already waiting. Class attributes a subclass may set:

    :cvar backend: the runtime's backend (``"auto"``: CUDA where the replica sees a GPU)
    :cvar gpu_memory: bytes the replica may use; by default its ``num_gpus`` fraction of
        the device's total memory (all of the free memory outside Ray or without one)
    """

    backend: str = "auto"
    gpu_memory: int | None = None

    def __init__(self) -> None:
        limit = None if self.gpu_memory is None else check_bytes(self.gpu_memory, "gpu_memory")
        share = None if limit is not None else gpu_fraction()
        self.runtime = Runtime(backend=self.backend, vram_limit=limit, vram_share=share)
        try:
            made = self.setup(self.runtime)
            self.pipelines: dict[str, Pipeline] = dict(made or {})
        except BaseException:
            self.runtime.close()
            raise
        self._reporter: asyncio.Task[None] | None = None
        self._gauges: dict[str, Any] | None = None
        self._last_waits: dict[ExecutionContext, list[tuple[float, int]]] = {}

    def setup(self, runtime: Runtime) -> Mapping[str, Pipeline] | None:
        """Create the replica's contexts and pipelines; return the pipelines by name."""
        return None

    async def run(self, pipeline: str, request: Any, meta: RequestMeta | None = None) -> Any:
        """Run one of :meth:`setup`'s pipelines with the request's tier, priority and
        deadline; return its output (``PipelineResult.output``).

        :raises LookupError: no pipeline has that name
        """
        self._start_reporting()
        try:
            chosen = self.pipelines[pipeline]
        except KeyError:
            raise LookupError(
                f"this replica has no pipeline {pipeline!r}; it has {sorted(self.pipelines)}"
            ) from None
        meta = meta or RequestMeta()
        result = await chosen.run(
            request, tier=meta.tier, priority=meta.priority, deadline=meta.deadline()
        )
        return result.output

    def usage(self) -> dict[str, dict[str, Any]]:
        """Every context's :class:`~pygpukit.runtime.ContextUsage`, as plain data."""
        return {ctx.name: asdict(ctx.usage()) for ctx in self.runtime.contexts}

    def vram_limit(self) -> int:
        """The bytes this replica's runtime manages: its share of the GPU."""
        return self.runtime.ledger.capacity

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Per tier, tasks queued and in flight now, and the p99 queue wait (seconds) of
        the tasks that finished since the last call — for Ray Serve's custom autoscaling
        policies (``AutoscalingConfig(policy=...)``), keyed ``"<TIER>_queued"``,
        ``"<TIER>_in_flight"``, ``"<TIER>_wait_p99_s"``."""
        stats: dict[str, float] = {}
        windows: dict[str, dict[float, int]] = {}  # tier -> bound -> waits since last call
        last, self._last_waits = self._last_waits, {}
        for ctx in self.runtime.contexts:
            u, tier = ctx.usage(), ctx.qos.name
            stats[f"{tier}_queued"] = stats.get(f"{tier}_queued", 0.0) + u.queued
            stats[f"{tier}_in_flight"] = stats.get(f"{tier}_in_flight", 0.0) + u.in_flight
            now = ctx.task_histograms()[0].cumulative()
            # per context, by the context object: one destroyed (and one made again under
            # its name) starts from nothing rather than going negative
            before = dict(last.get(ctx, []))
            self._last_waits[ctx] = now
            window = windows.setdefault(tier, {})
            for bound, n in now:
                window[bound] = window.get(bound, 0) + max(0, n - before.get(bound, 0))
        for tier, window in windows.items():
            p99 = quantile(sorted(window.items()), 0.99)
            stats[f"{tier}_wait_p99_s"] = 0.0 if p99 is None else p99
        return stats

    def report_metrics(self) -> None:
        """Set the replica's ``ray.serve.metrics`` gauges (tagged with deployment and replica
        by Ray): per context, memory held and its budget, tasks queued and in flight, tasks
        finished, GPU seconds."""
        from ray.serve import metrics

        if self._gauges is None:
            keys: Any = ("context", "tier")
            self._gauges = {
                key: metrics.Gauge(f"pygpukit_{name}", description=doc, tag_keys=keys)
                for key, name, doc in (
                    ("held", "context_memory_held_bytes", "Device bytes the context holds"),
                    ("max", "context_memory_budget_bytes", "The context's budget"),
                    ("queued", "tasks_queued", "Tasks waiting to launch"),
                    ("in_flight", "tasks_in_flight", "Tasks whose GPU work runs"),
                    ("tasks", "tasks_finished", "Tasks finished, in all"),
                    ("gpu_time_s", "task_gpu_seconds", "GPU seconds of finished tasks"),
                )
            }
        for ctx in self.runtime.contexts:
            u = ctx.usage()
            tags = {"context": ctx.name, "tier": ctx.qos.name}
            for key, gauge in self._gauges.items():
                gauge.set(float(getattr(u, key)), tags=tags)

    def _start_reporting(self) -> None:
        if self._reporter is None:
            self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def _report_forever(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a metrics hiccup must not stop serving
                self.report_metrics()
            await asyncio.sleep(METRICS_INTERVAL_S)

    def __del__(self) -> None:  # Ray Serve calls it when the replica shuts down
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.cancel()
        runtime = getattr(self, "runtime", None)
        if runtime is not None:
            runtime.close()


class LoadedModel:
    """One model of a :class:`ModelPool`: its context and what :attr:`ModelPool.load`
    returned, managed as evictable. Use it through :meth:`session`, which pages it back in
    (others out, for room) and keeps it on the device while the block runs."""

    __slots__ = ("_handle", "_pool", "context", "model_id", "nbytes")

    def __init__(
        self, pool: ModelPool, model_id: str, context: ExecutionContext, handle: Any
    ) -> None:
        self._pool = pool
        self.model_id = model_id
        self.context = context
        self._handle = handle
        self.nbytes = int(handle.nbytes)

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[Any]:
        """``async with loaded.session() as model:`` — the model on the device, in its
        context's session (its stream and budget bound), for the block; the models used
        longest ago are paged out first where it needs the room (all the others, if that
        was not enough). Call it per request: an object ``@serve.multiplexed`` cached is
        paged in here, not by the cache. Paging runs on a worker thread, off the loop.

        :raises VRAMBudgetExceeded: it does not fit even with every other model not in use
            paged out
        """
        pool = self._pool
        async with contextlib.AsyncExitStack() as stack:
            async with pool._lock:  # no other request pages models meanwhile
                await pool._page_in(self)
                # entered before the lock goes: a session pins the model on the device
                await stack.enter_async_context(context_session(self.context))
            yield self.model

    @property
    def model(self) -> Any:
        """The model (a device array or a ``torch.nn.Module``), restored if it was paged
        out."""
        handle = self._handle
        return handle.module if hasattr(handle, "module") else handle.array

    @property
    def on_device(self) -> bool:
        return bool(self._handle.on_device)


class ModelPool:
    """Models loaded on demand, each into a BestEffort context of its own, paged to host
    memory — not dropped — when another needs the room, and brought back on their next use.

    :param runtime: where the models' contexts are made
    :param load: ``load(model_id)`` builds one model, called inside its context's session
        (so its memory is charged there): a device array or a ``torch.nn.Module`` on the
        context's device
    :param max_vram: each model's budget
    :param qos: the models' tier (BestEffort by default; not Guaranteed, which is never
        paged out)
    """

    def __init__(
        self,
        runtime: Runtime,
        load: Callable[[str], Any],
        *,
        max_vram: int,
        qos: QoSPolicy | str = QoSPolicy.BEST_EFFORT,
    ) -> None:
        if not callable(load):
            raise InvalidArgumentType("ModelPool() takes a callable load(model_id)")
        self.tier = QoSPolicy.coerce(qos)
        if self.tier is QoSPolicy.GUARANTEED:
            raise InvalidArgument(
                "a ModelPool pages models out, and Guaranteed contexts are never paged out; "
                "use QoSPolicy.BEST_EFFORT (the default) or BURSTABLE"
            )
        self.runtime = runtime
        self.load = load
        self.max_vram = check_bytes(max_vram, "max_vram")
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()  # least recent first
        self._lock = asyncio.Lock()

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._models

    @property
    def model_ids(self) -> tuple[str, ...]:
        """The models loaded, least recently used first."""
        return tuple(self._models)

    def resident(self) -> dict[str, bool]:
        """Each model, least recently used first: whether it is on the device now."""
        return {model_id: m.on_device for model_id, m in self._models.items()}

    async def get(self, model_id: str) -> LoadedModel:
        """The model ``model_id``, loaded now if it is new (after paging out the models used
        longest ago, as far as its budget needs). Use it through
        :meth:`LoadedModel.session`, which pages it back in when it was paged out.

        :raises VRAMBudgetExceeded: it does not fit even with every other model paged out
        """
        check_name(model_id, "model_id")
        async with self._lock:
            loaded = self._models.get(model_id)
            if loaded is not None:
                self._models.move_to_end(model_id)
                return loaded
            await self._make_room(self.max_vram, keep=model_id)
            ctx = self.runtime.create_context(f"model-{model_id}", self.max_vram, qos=self.tier)
            try:
                handle = await self._load(ctx, model_id)
            except BaseException:
                ctx.close()
                raise
            loaded = self._models[model_id] = LoadedModel(self, model_id, ctx, handle)
            return loaded

    async def _page_in(self, loaded: LoadedModel) -> None:
        """Bring ``loaded`` back if it was paged out (call with the lock held)."""
        if self._models.get(loaded.model_id) is not loaded:
            raise InvalidArgument(
                f"model {loaded.model_id!r} was unloaded from this pool; get() it again"
            )
        self._models.move_to_end(loaded.model_id)
        if loaded.on_device:
            return
        for attempt in (1, 2):
            # room first (the models used longest ago), then the copy back, both off the
            # event loop: they synchronize streams and copy whole models
            await self._make_room(loaded.nbytes if attempt == 1 else None, keep=loaded.model_id)
            try:
                await anyio.to_thread.run_sync(_enter_and_leave, loaded.context)
                return
            except VRAMBudgetExceeded:
                if attempt == 2:
                    raise

    async def _load(self, ctx: ExecutionContext, model_id: str) -> Any:
        for attempt in (1, 2):
            try:
                return await anyio.to_thread.run_sync(self._load_here, ctx, model_id)
            except VRAMBudgetExceeded:
                # the estimate was short (another context grew meanwhile): page out every
                # other model, then try once more
                if attempt == 2 or not await self._make_room(None, keep=model_id):
                    raise
        raise AssertionError("unreachable")

    def _load_here(self, ctx: ExecutionContext, model_id: str) -> Any:
        with context_session(ctx):  # this worker thread's session: charged to ctx
            return ctx.evictable(self.load(model_id))

    async def _make_room(self, need: int | None, *, keep: str) -> int:
        """Page out models, least recently used first, until ``need`` bytes are free (all of
        them but ``keep`` with ``None``); returns the bytes freed. Models in use are kept."""
        return await anyio.to_thread.run_sync(self._make_room_here, need, keep)

    def _make_room_here(self, need: int | None, keep: str) -> int:
        freed = 0
        for model_id, loaded in list(self._models.items()):
            if need is not None and self.runtime.available_vram() >= need:
                break
            if model_id != keep and loaded.on_device:
                freed += loaded.context.evict()  # 0 while a request uses it
        return freed

    async def unload(self, model_id: str) -> None:
        """Forget a model and destroy its context (after the pool's other work: do not
        unload a model a request is using)."""
        async with self._lock:
            loaded = self._models.pop(model_id, None)
            if loaded is not None:
                loaded.context.close()


def _enter_and_leave(ctx: ExecutionContext) -> None:
    with context_session(ctx):  # entering the context brings its buffers back
        pass


def remote_stage(
    name: str,
    call: Callable[[BaseModel, RequestMeta], Any],
    input_model: type[BaseModel],
    output_model: type[BaseModel],
) -> Stage:
    """A pipeline stage that runs in another deployment: ``call(inp, meta)`` returns what
    to await — e.g. ``lambda inp, meta: tts_handle.speak.remote(inp, meta)`` — with
    ``meta`` the request's tier, priority and deadline (:meth:`RequestMeta.current`). The
    stage is typed by ``input_model`` and ``output_model``, so a pipeline built of local and
    remote stages is checked when built; what comes back is validated as ``output_model``.

    :raises PipelineValidationError: the stage name is taken
    """
    check_name(name, "stage name")
    if not callable(call):
        raise InvalidArgumentType("remote_stage() takes a callable call(inp, meta)")

    async def remote(inp: BaseModel) -> BaseModel:
        reply = await call(inp, RequestMeta.current())
        if isinstance(reply, output_model):
            return reply
        return output_model.model_validate(reply)

    remote.__annotations__ = {"inp": input_model, "return": output_model}
    remote.__qualname__ = remote.__name__ = f"remote_{name}"
    return stage(name)(remote)
