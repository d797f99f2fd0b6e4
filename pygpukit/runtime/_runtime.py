"""The Runtime: one device, its contexts, its memory ledger, the completion bridge, and
the execution of submitted tasks under a scheduling policy."""

from __future__ import annotations

import atexit
import functools
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._exceptions import (
    ContextClosed,
    DuplicateContextName,
    InvalidArgument,
    InvalidArgumentType,
)
from .._locks import give_back
from .._units import MB
from ._backends import Backend, DeviceInfo, backend_class, resolve_backend_name
from ._completion import CompletionBridge, default_bridge
from ._context import ContextState, ExecutionContext, _current
from ._dispatch import Dispatcher
from ._health import HealthState, RuntimeHealth
from ._launcher import LauncherConfig, TaskRunner
from ._ledger import Ledger, PressureHandler
from ._session import hook_running_loop, register_binder, unregister_binder
from ._stream import Event, Stream
from ._tasks import PartitionPolicy, SchedulingPolicy, Task
from ._tiers import QoSPolicy
from ._trace import Trace
from .checks import check_bytes, check_instance, check_name

__all__ = ("Runtime",)

# Memory left to the CUDA context, cuBLAS workspaces and libraries that bypass our pools.
CUDA_HEADROOM = 256 * MB

_live: weakref.WeakSet[Runtime] = weakref.WeakSet()
_HEALTHY = RuntimeHealth(HealthState.OK)


class Runtime:
    """Owns one device: its backend, contexts, memory ledger and completion bridge.

    :param device_id: which device
    :param backend: ``"auto"`` (CUDA when a GPU is visible; ``PYGPUKIT_BACKEND`` overrides),
        ``"cuda"`` or ``"host"``
    :param vram_limit: bytes the runtime may hand out; by default the device's free memory
        at start (less 256 MiB of headroom on CUDA)
    :param vram_share: instead of ``vram_limit``, the share of the device's *total* memory
        (less the 256 MiB of headroom on CUDA) the runtime may hand out (``0 < share <=
        1``; at most what is free at start): what one of several processes sharing a GPU
        gets, e.g. a Ray Serve replica's ``num_gpus`` fraction
    :param bridge: the completion bridge (the process-wide one by default)
    :param policy: decides when submitted tasks launch; by default a
        :class:`~pygpukit.runtime.Dispatcher` (one queue by tier, priority, arrival; caps;
        deadlines). A policy serves one runtime.
    :param launcher: how launched tasks are executed (inline execution, shared completion
        signals)
    """

    def __init__(
        self,
        device_id: int = 0,
        backend: str = "auto",
        *,
        vram_limit: int | None = None,
        vram_share: float | None = None,
        bridge: CompletionBridge | None = None,
        policy: SchedulingPolicy | None = None,
        launcher: LauncherConfig | None = None,
    ) -> None:
        if not isinstance(device_id, int) or isinstance(device_id, bool):
            raise InvalidArgumentType(f"device_id must be an int, not {device_id!r}")
        if device_id < 0:
            raise InvalidArgument(f"device_id must not be negative, got {device_id}")
        if launcher is not None:
            check_instance(launcher, LauncherConfig, "launcher", "e.g. LauncherConfig(batch_us=0)")
        if vram_limit is not None:  # before anything is made
            vram_limit = check_bytes(vram_limit, "vram_limit")
        if vram_share is not None:
            vram_share = _check_share(vram_share, vram_limit)
        policy = Dispatcher() if policy is None else policy
        cls: Any = backend_class(resolve_backend_name(backend))
        self.backend: Backend = cls(device_id)
        self.device: DeviceInfo = self.backend.info()
        self.bridge = bridge or default_bridge()
        #: the scheduling policy deciding when submitted tasks launch
        self.policy = policy
        try:  # binds the policy, which refuses one that serves another runtime
            self.tasks = TaskRunner(self.backend, self.bridge, policy, launcher or LauncherConfig())
        except BaseException:
            self.backend.close()  # nothing else is made yet
            raise
        free, total = self.backend.mem_get_info()
        if vram_share is not None:  # of what a runtime may use: the headroom stays out
            usable = total - CUDA_HEADROOM if self.backend.name == "cuda" else total
            vram_limit = int(max(0, usable) * vram_share)
        if vram_limit is None:
            capacity = free - CUDA_HEADROOM if self.backend.name == "cuda" else free
        else:
            capacity = min(vram_limit, free)
        self.ledger = Ledger(max(0, capacity))
        self._unscoped = self.backend.create_pool(
            lambda n: self.ledger.grow(self.ledger.unscoped, n),
            lambda n: self.ledger.shrink(self.ledger.unscoped, n),
        )
        self.ledger.unscoped.trim = self._unscoped.release_cached
        self._contexts: dict[str, ExecutionContext] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.backend.install_router(self._route)
        register_binder(self.backend)
        # a runtime dropped without close() must not leave its backend bound at every step
        # (once nothing holds it: the newest runtime stays installed as CuPy's allocator)
        self._unregister = weakref.finalize(self, give_back, unregister_binder, self.backend)
        hook_running_loop()
        _live.add(self)

    # -- allocation routing ---------------------------------------------------------------
    def _route(self, nbytes: int) -> Any:
        # Called by the array library for every cache miss of its own: one Python frame.
        ctx = _current.get()
        pool = self._unscoped if ctx is None else ctx._pool
        try:
            return pool.fast_malloc(nbytes)
        except Exception as exc:
            error = pool.translate(exc, nbytes)
            if error is exc:
                raise
            raise error from exc

    @property
    def xp(self) -> Any:
        """The array namespace whose allocations are charged (CuPy, or NumPy on host)."""
        return self.backend.xp

    # -- streams and events ---------------------------------------------------------------
    def create_stream(self, priority: int | None = None) -> Stream:
        """A new non-blocking stream; ``priority`` defaults to the device's least."""
        least, greatest = self.device.priority_range
        if priority is None:
            priority = least
        lo, hi = min(least, greatest), max(least, greatest)
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidArgumentType(f"stream priority must be an int, not {priority!r}")
        if not lo <= priority <= hi:
            raise InvalidArgument(
                f"stream priority {priority!r} is outside this device's range "
                f"{greatest} (greatest) to {least} (least)"
            )
        return Stream._wrap(self.backend.create_stream(priority), self.backend, self.bridge)

    def create_event(self, *, timing: bool = False) -> Event:
        return Event._wrap(self.backend.create_event(timing=timing), self.backend, self.bridge)

    # -- contexts -------------------------------------------------------------------------
    def create_context(
        self,
        name: str,
        max_vram: int,
        base_vram: int | None = None,
        qos: QoSPolicy | str = QoSPolicy.BURSTABLE,
        partition: str | None = None,
    ) -> ExecutionContext:
        """Create an execution context with its own stream and an enforced VRAM budget.

        :param max_vram: the most device memory the context may ever hold
        :param base_vram: Burstable only: the part reserved for it (default 0)
        :param qos: the tier; Guaranteed reserves ``max_vram`` now
        :raises InvalidArgument: a bad name, budget or tier
        :raises DuplicateContextName: a live context has this name
        :raises AdmissionRejected: the tier's reservation does not fit
        """
        self._check_open()
        check_name(name, "context name")
        max_vram = check_bytes(max_vram, "max_vram")
        tier = QoSPolicy.coerce(qos)
        if base_vram is not None:
            base_vram = check_bytes(base_vram, "base_vram", allow_zero=True)
            if tier is not QoSPolicy.BURSTABLE:
                raise InvalidArgument(
                    f"base_vram applies to BURSTABLE contexts only; {tier.name} "
                    f"{'reserves max_vram' if tier is QoSPolicy.GUARANTEED else 'reserves nothing'}"
                    " — drop base_vram or use qos=QoSPolicy.BURSTABLE"
                )
            if base_vram > max_vram:
                raise InvalidArgument(
                    f"base_vram ({base_vram}) must not exceed max_vram ({max_vram}); "
                    "raise max_vram or lower base_vram"
                )
        if partition is not None:
            check_name(partition, "partition")
        if max_vram > self.ledger.capacity:
            raise InvalidArgument(
                f"max_vram ({max_vram}) exceeds what this runtime manages "
                f"({self.ledger.capacity} bytes on {self.device.name}); lower it"
            )
        partitions = self.tasks.partitions
        if partition is not None and partitions is None:
            raise InvalidArgument(
                f"context {name!r} asks for partition {partition!r} but this runtime has no "
                "partitions; call use_partitions(PartitionManager(...)) first"
            )
        hook_running_loop()
        with self._lock:
            if name in self._contexts:
                raise DuplicateContextName(name)
            account = self.ledger.open(name, tier, max_vram, base_vram or 0)
            if partition is not None:
                assert partitions is not None
                try:
                    partitions.attach(partition, name)
                except BaseException:
                    self.ledger.close(account)
                    raise
                account.charge_hook = functools.partial(partitions.charge, partition, name)
                account.release_hook = _releaser(partitions, partition)
            raw = None
            try:
                priority = tier.stream_priority(self.device.priority_range)
                raw = self.backend.create_stream(priority)
                stream = Stream._wrap(raw, self.backend, self.bridge)
                pool = self.backend.create_pool(
                    lambda n: self.ledger.grow(account, n),
                    lambda n: self.ledger.shrink(account, n),
                    # Guaranteed: take max_vram from the device now, so nothing else can
                    arena_bytes=max_vram if tier is QoSPolicy.GUARANTEED else 0,
                    label=name,
                    stream=raw,
                )
                self.backend.adopt(raw, self.ledger, account, pool)
            except BaseException:
                if raw is not None:
                    raw.close()
                self.ledger.close(account)
                if partition is not None:
                    assert partitions is not None
                    partitions.detach(partition, name)
                raise
            ctx = ExecutionContext._make(
                self, stream, account, pool, partition, self.tasks.submit, self.policy.counts
            )
            self._contexts[name] = ctx
        return ctx

    def destroy_context(self, ctx: ExecutionContext) -> None:
        """Finish the context's work, release its reservation and cached memory.

        Arrays it allocated stay charged to it until they are freed. Idempotent.
        """
        if not isinstance(ctx, ExecutionContext):
            raise InvalidArgumentType(
                f"destroy_context() takes an ExecutionContext, not {type(ctx).__name__}"
            )
        if ctx._runtime is not self:
            raise InvalidArgument(f"context {ctx.name!r} belongs to another runtime")
        with self._lock:
            if ctx.state is ContextState.CLOSED:
                return
            ctx.state = ContextState.CLOSED
            if self._contexts.get(ctx.name) is ctx:
                del self._contexts[ctx.name]
        ctx._eviction.close()
        try:
            self.tasks.context_closed(ctx)
            ctx.stream.close()
        finally:
            ctx._pool.close()
            self.ledger.close(ctx._account)
            partitions = self.tasks.partitions
            if ctx.partition is not None and partitions is not None:
                partitions.detach(ctx.partition, ctx.name)

    def get_context(self, name: str) -> ExecutionContext:
        try:
            return self._contexts[name]
        except KeyError:
            raise InvalidArgument(f"no live context is named {name!r}") from None

    @property
    def contexts(self) -> tuple[ExecutionContext, ...]:
        return tuple(self._contexts.values())

    # -- memory -----------------------------------------------------------------------------
    def available_vram(self) -> int:
        """Unreserved device memory not in use: what a new reservation could take."""
        return self.ledger.available()

    def on_memory_pressure(self, handler: PressureHandler) -> PressureHandler:
        """Register ``handler(ctx, requested, available) -> bool`` (usable as a decorator).

        It is called when an allocation does not fit: ``False`` rejects it, ``True`` lets the
        runtime make room. An allocation the handler makes itself is decided without asking
        the handlers again; a handler that raises counts as a refusal, and the caller gets
        :class:`~pygpukit.VRAMBudgetExceeded` with the handler's exception as its cause.
        """
        if not callable(handler):
            raise InvalidArgumentType("on_memory_pressure() takes a callable handler")
        self.ledger.handlers.append(handler)
        return handler

    def remove_memory_pressure_handler(self, handler: PressureHandler) -> None:
        self.ledger.handlers.remove(handler)

    # -- tasks and partitions ---------------------------------------------------------------
    def use_partitions(self, manager: PartitionPolicy) -> None:
        """Enforce ``manager``'s partitions (e.g. a :class:`~pygpukit.qos.PartitionManager`)
        for contexts created with ``partition=``: their memory limits at allocation, their
        compute shares when tasks launch.

        :raises InvalidArgument: contexts already use the current partitions
        """
        if not isinstance(manager, PartitionPolicy):  # a runtime-checkable protocol
            raise InvalidArgumentType(
                "use_partitions() takes a PartitionManager (or another PartitionPolicy), "
                f"not {type(manager).__name__}"
            )
        if any(c.partition is not None for c in self.contexts):
            raise InvalidArgument(
                "contexts already use the current partitions; destroy them before switching"
            )
        self.tasks.partitions = manager

    @property
    def partitions(self) -> PartitionPolicy | None:
        """The partitions given to :meth:`use_partitions`, if any."""
        return self.tasks.partitions

    def on_task_done(self, listener: Callable[[Task], None]) -> Callable[[Task], None]:
        """Call ``listener(task)`` as each submitted task finishes (timelines, metrics).

        It runs on the thread that drains completions, so it must be quick; what it raises
        is logged, not propagated. Usable as a decorator.
        """
        if not callable(listener):
            raise InvalidArgumentType("on_task_done() takes a callable listener")
        self.tasks.listeners.append(listener)
        return listener

    def trace(self, path: str | Path | None = None, *, max_tasks: int = 100_000) -> Trace:
        """Record every task that finishes while the returned :class:`Trace` is open::

            with rt.trace("run.json"):
                await serve()

        writes a Chrome / Perfetto trace (https://ui.perfetto.dev): a row per context, a
        slice per task spanning its GPU work (device times from its events), with its
        tier, stream, queue wait and GPU time. ``path=None`` keeps it in memory only
        (:meth:`Trace.chrome`). At most ``max_tasks`` are kept, the oldest dropped first.
        Recording costs each task two event reads.

        :raises InvalidArgument: a trace is already recording on this runtime (when the
            ``with`` block is entered)
        """
        self._check_open()
        return Trace(self.tasks, self.backend, self.device, path, max_tasks)

    def pytorch_charged(self) -> tuple[bool, str]:
        """Whether PyTorch's CUDA allocations in this runtime's sessions and tasks are
        charged to their contexts, and if not, why. Imports torch if it is installed (and
        sets up its pools, as the first task step with torch imported would)."""
        import importlib.util

        if importlib.util.find_spec("torch") is None:
            return False, "torch is not installed"
        import torch  # noqa: F401  (governed once imported)

        from ._backends import _torch

        if self.backend.name != "cuda":
            return False, "on the host backend PyTorch runs on the CPU"
        if _torch.torch_ready() is None:
            return False, _torch.why_not()
        return True, ""

    # -- lifetime ---------------------------------------------------------------------------
    def health(self) -> RuntimeHealth:
        """Whether the runtime can still run work, from what it knows already: nothing is
        asked of the device, so health probes may call it as often as they like.

        ``FAULTED`` once its device faulted: the completion watchdog, which queries the
        device while work is awaited (every submitted task's work is), found the device's
        sticky error and failed those awaits with it. A CUDA context never recovers from a
        fault: the process must be restarted. ``CLOSED`` after :meth:`close`.
        """
        if self._closed:
            return RuntimeHealth(HealthState.CLOSED)
        fault = self.bridge.fault(self.backend)
        if fault is not None:
            return RuntimeHealth(HealthState.FAULTED, fault)
        return _HEALTHY

    def _check_open(self) -> None:
        if self._closed:
            raise ContextClosed("<runtime>")

    def close(self) -> None:
        """Destroy every context and finish outstanding work; idempotent."""
        if self._closed:
            return
        for ctx in list(self._contexts.values()):
            self.destroy_context(ctx)
        self._closed = True
        self.tasks.close()
        self._unregister()
        self.backend.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Runtime backend={self.backend.name} device={self.device.name!r} "
            f"contexts={len(self._contexts)} {'closed' if self._closed else 'open'}>"
        )


def _check_share(share: object, vram_limit: int | None) -> float:
    if vram_limit is not None:
        raise InvalidArgument(
            "give vram_limit (bytes) or vram_share (a share of the device), not both"
        )
    if isinstance(share, bool) or not isinstance(share, int | float):
        raise InvalidArgumentType(f"vram_share must be a number, not {share!r}")
    if not 0 < share <= 1:
        raise InvalidArgument(
            f"vram_share must be more than 0 and at most 1 (a share of the device's memory), "
            f"not {share!r}; e.g. vram_share=0.5"
        )
    return float(share)


def _releaser(partitions: PartitionPolicy, partition: str) -> Callable[[int], None]:
    def release(nbytes: int) -> None:
        try:
            partitions.release(partition, nbytes)
        except InvalidArgument:  # the partition was deleted or replaced meanwhile
            pass

    return release


@atexit.register
def _shutdown() -> None:
    # Finish all device work (every stream, companions included) so that no host function
    # fires into a dying interpreter.
    for rt in list(_live):
        if not rt._closed:
            try:
                rt.backend.synchronize()
            except Exception:
                pass
