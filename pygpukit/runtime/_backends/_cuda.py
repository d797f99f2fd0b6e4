"""The CUDA backend, on CuPy (>= 14.1): devices, streams, events, graphs.

CuPy is imported in ``_cuda_calls.py`` and used by this module and ``_cuda_pool.py`` (the
device memory) alone. Its errors never leave them untranslated: CUDA runtime errors become
:class:`~pygpukit.CudaError`, allocation failures :class:`~pygpukit.VRAMBudgetExceeded`.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

from ..._exceptions import BackendUnavailable, CudaError, InvalidArgument
from ._base import Backend, DeviceInfo, Grower, RawEvent, RawGraph, RawStream, Shrinker, Signal
from ._cuda_calls import (
    NOT_READY,
    check,
    cupy,
    error_name,
    load_exchange,
    relaxed,
    translated,
)
from ._cuda_calls import runtime as _rt
from ._cuda_pool import SHARED, CudaPool, DevicePool
from ._torch import TorchMemory, torch_ready

__all__ = ("CudaBackend",)

_FOREIGN_EVENT = "a CUDA stream can only record or wait for events of the same runtime's backend"


def _push_from_python(arg: tuple[Signal, int]) -> None:
    signal, slot = arg
    signal.push(slot)


class CudaEvent(RawEvent):
    def __init__(self, backend: CudaBackend, timing: bool) -> None:
        with translated(), cupy.cuda.Device(backend.device_id):  # an event is a device's
            self._ev = cupy.cuda.Event(block=False, disable_timing=not timing)
        self.handle = int(self._ev.ptr)
        self._backend = backend
        self.origin: CudaStream | None = None

    def query(self) -> bool:
        return check(relaxed(_rt.eventQuery, self.handle), "cudaEventQuery")

    def synchronize(self) -> None:
        with translated():
            self._ev.synchronize()

    def elapsed_ms(self, end: RawEvent) -> float:
        if type(end) is not CudaEvent:
            raise InvalidArgument("elapsed time needs two events of the same backend")
        with translated():
            return float(relaxed(cupy.cuda.get_elapsed_time, self._ev, end._ev))

    def signal_when_done(self, slot: int, signal: Signal) -> None:
        origin = self.origin
        if origin is None:  # never recorded: complete, as CUDA reports it
            signal.push(slot)
            return
        # A companion stream of the origin waits for the event, then signals; the origin
        # stream itself may already have later work queued behind the event.
        companion = origin.companion()
        companion.wait_event(self)
        companion.signal_when_done(slot, signal)

    def close(self) -> None:
        """CuPy destroys the handle when the last reference goes; nothing to do early."""


def _capturing(stream: Any) -> bool:
    """Whether work queued on ``stream`` now would be captured (an error counts as yes: a
    capture invalidated by an error, or the null stream while another stream captures)."""
    try:
        return bool(stream.is_capturing())
    except Exception:
        return True


class CudaStream(RawStream):
    def __init__(self, backend: CudaBackend, priority: int) -> None:
        with translated(), cupy.cuda.Device(backend.device_id):
            self.cp = cupy.cuda.Stream(non_blocking=True, priority=priority)
        self.handle = int(self.cp.ptr)
        self.priority = priority
        self._backend = backend
        backend._ours[self.handle] = self
        SHARED.streams[self.handle] = self
        self._companion: CudaStream | None = None
        self._torch: Any = None
        self.memory: TorchMemory | None = None  # PyTorch's pools of the context (adopt)
        self._closed = False
        self.capturing = False
        # Held while a capture begins, and by a free on this stream while it decides between
        # queueing and deferring: a free never lands in a capture that began meanwhile.
        # Reentrant: a block's finalizer can run on the thread beginning the capture.
        self.capture_lock = threading.RLock()

    def captured(self) -> bool:
        """Whether work queued on this stream now would be recorded into a graph: our own
        capture, or one CUDA reports (someone else's, or one an error invalidated)."""
        return self.capturing or _capturing(self.cp)

    def companion(self) -> CudaStream:
        if self._companion is None:
            with self._backend._lock:
                if self._companion is None:
                    self._companion = CudaStream(self._backend, self.priority)
        return self._companion

    def torch_stream(self) -> Any:
        if self._torch is None:
            import torch

            self._torch = torch.cuda.ExternalStream(  # type: ignore[no-untyped-call,unused-ignore]
                self.handle, device=self._backend.device_id
            )
        return self._torch

    def synchronize(self) -> None:
        with translated():
            self.cp.synchronize()

    def query(self) -> bool:
        if self.capturing:  # querying a capturing stream would break the capture
            return False
        return check(relaxed(_rt.streamQuery, self.handle), "cudaStreamQuery")

    def record(self, event: RawEvent) -> None:
        if type(event) is not CudaEvent:  # not isinstance: an ABC check costs ~0.5 µs
            raise InvalidArgument(_FOREIGN_EVENT)
        with translated():
            event._ev.record(self.cp)
        event.origin = self

    def wait_event(self, event: RawEvent) -> None:
        if type(event) is not CudaEvent:
            raise InvalidArgument(_FOREIGN_EVENT)
        with translated():
            self.cp.wait_event(event._ev)

    def launch_host_func(self, fn: Callable[[], object]) -> None:
        with translated():
            self.cp.launch_host_func(lambda _arg: fn(), None)

    def signal_when_done(self, slot: int, signal: Signal) -> None:
        native = signal.native
        if native is not None:
            status = native.launch(self.handle, slot)
            if status != 0:
                raise CudaError(
                    f"cuLaunchHostFunc failed with CUDA driver error {status}", status=status
                )
        else:
            with translated():
                self.cp.launch_host_func(_push_from_python, (signal, slot))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.cp.synchronize()
        except _rt.CUDARuntimeError:
            pass
        if self.memory is not None:  # PyTorch's segments go back on this stream, still open
            self.memory.close()
        # no longer ours: once CuPy destroys it, another stream may get the same handle
        self._backend._ours.pop(self.handle, None)
        SHARED.streams.pop(self.handle, None)
        if self._companion is not None:
            self._companion.close()


class CudaGraph(RawGraph):
    """A CUDA graph and the device memory its kernels read and write."""

    def __init__(self, graph: Any, keep: list[Any]) -> None:
        self._graph: Any = graph
        self._keep: list[Any] | None = keep
        self._streams: dict[int, CudaStream] = {}  # every stream it was launched on

    def launch(self, stream: RawStream) -> None:
        assert isinstance(stream, CudaStream)
        if self._graph is None:
            raise InvalidArgument("this graph is closed; capture the work again")
        with translated():
            self._graph.launch(stream.cp)
        self._streams[stream.handle] = stream

    def close(self) -> None:
        """Free the graph's buffers once every replay has run."""
        for stream in self._streams.values():
            try:
                stream.cp.synchronize()
            except _rt.CUDARuntimeError:
                pass
        self._graph = self._keep = None
        self._streams.clear()


class CudaBackend(Backend):
    """One CUDA device through CuPy."""

    name = "cuda"
    spin_helps = True

    @staticmethod
    def _device_count() -> int:
        """Visible CUDA devices (0 where the driver is missing or broken)."""
        try:
            return _device_count_impl()
        except Exception:
            return 0

    def __init__(self, device_id: int = 0) -> None:
        try:
            count = _rt.getDeviceCount()
        except _rt.CUDARuntimeError as exc:
            raise BackendUnavailable(
                f"no usable CUDA GPU ({exc}); use backend='host' or check the driver"
            ) from exc
        if count == 0:
            raise BackendUnavailable("no CUDA GPU is visible; use backend='host'")
        if not 0 <= device_id < count:
            raise InvalidArgument(
                f"device_id={device_id} does not exist; this machine has {count} CUDA "
                f"device(s), numbered 0 to {count - 1}"
            )
        self.device_id = device_id
        load_exchange()
        # More than one device visible: a thread's current device may not be ours, so
        # binding our stream also makes our device current (bind_stream).
        self._several = count > 1
        with translated(), cupy.cuda.Device(device_id):
            props = _rt.getDeviceProperties(device_id)
            _rt.memGetInfo()  # make the primary context current on this thread
            least, greatest = _priority_range()
        name = props["name"]
        self._info = DeviceInfo(
            backend="cuda",
            device_id=device_id,
            name=name.decode() if isinstance(name, bytes) else str(name),
            total_memory=int(props["totalGlobalMem"]),
            priority_range=(least, greatest),
            multiprocessor_count=int(props["multiProcessorCount"]),
            compute_capability=f"{props['major']}.{props['minor']}",
            driver=_version(_rt.driverGetVersion()),
        )
        self._local = threading.local()
        self._lock = threading.Lock()
        # Our open streams by handle: to spot a leaked binding, and to give pool memory only
        # to a stream we own, never to a non-owning wrapper of its handle. Weak: a stream
        # nobody closed must still be destroyable.
        self._ours: weakref.WeakValueDictionary[int, CudaStream] = weakref.WeakValueDictionary()
        self._closed = False
        self._pool = DevicePool.open(self, device_id)
        self._book: Any = None  # the ledger's native book, once a context is adopted

    def device_memory(self, nbytes: int, stream: Any = None) -> Any:
        """``nbytes`` of device memory (an object with ``ptr``), given back when it dies.

        From the stream-ordered pool, allocated and later freed on ``stream`` (a CuPy
        stream; the current one by default), when that is one of this backend's streams
        and is not being captured; otherwise from ``cudaMalloc``.
        """
        current = stream if stream is not None else cupy.cuda.get_current_stream()
        return self._pool.take(nbytes, self._ours.get(current.ptr))

    @property
    def pool_handle(self) -> int:
        """The stream-ordered pool's handle (0 without one, or once closed)."""
        return self._pool.pool or 0

    def own_block(self, arena: Any, stream: Any) -> tuple[int, int]:
        """Give a native Arena its block (a Guaranteed reservation), on ``stream``."""
        return self._pool.own(arena, stream)

    def adopt(self, stream: RawStream, ledger: Any, account: Any, pool: Any) -> None:
        """Charge the PyTorch allocations of the context that owns ``stream`` and ``pool``
        to ``account``, in ``ledger``'s book (its native book only: PyTorch charges it from
        C); a Guaranteed context's are carved from its arena."""
        from .._book import native

        assert isinstance(stream, CudaStream)
        assert isinstance(pool, CudaPool)
        book = ledger.book
        if native is None or not isinstance(book, native.Book):
            return
        self._book = book
        book.set_pool(self.pool_handle)
        if isinstance(pool._arena, native.Arena):
            book.set_arena(account.id, pool._arena)
        memory = TorchMemory(
            account.name, book, account.id, self.device_id, partial(ledger.relieve, account)
        )
        stream.memory = pool.torch_memory = memory

    def _make_room(self) -> None:
        """What an allocation that ran out of device memory does before it tries once more:
        wait for the frees queued on every backend's streams, and trim every pool."""
        SHARED.make_room()

    def stop_pooling(self) -> None:
        """Take device memory with ``cudaMalloc`` from now on, and give the pool's unused
        memory back (what ``PYGPUKIT_STREAM_ORDERED=0`` does from the start; the eviction
        benchmark's baseline)."""
        if self._book is not None:
            self._book.set_pool(0)
        self._pool.close()

    @property
    def stream_ordered(self) -> bool:
        """Whether device memory comes from the stream-ordered pool."""
        return self._pool.pool is not None

    @property
    def pool_idle_s(self) -> float:
        """How long the pool keeps unused memory after its last use (PYGPUKIT_POOL_IDLE_S)."""
        return self._pool.idle_s

    def pool_bytes(self) -> tuple[int, int]:
        """``(reserved, used)``: bytes the stream-ordered pool holds from the driver, and
        those of them allocations use (the rest is kept for reuse); zeros without it."""
        return self._pool.use()

    def info(self) -> DeviceInfo:
        return self._info

    def mem_get_info(self) -> tuple[int, int]:
        with translated(), cupy.cuda.Device(self.device_id):
            free, total = _rt.memGetInfo()
        return int(free), int(total)

    def create_stream(self, priority: int) -> CudaStream:
        return CudaStream(self, priority)

    def create_event(self, *, timing: bool = False) -> CudaEvent:
        return CudaEvent(self, timing)

    def create_pool(
        self,
        grow: Grower,
        shrink: Shrinker,
        arena_bytes: int = 0,
        label: str | None = None,
        stream: RawStream | None = None,
    ) -> CudaPool:
        assert stream is None or isinstance(stream, CudaStream)
        return CudaPool(self, grow, shrink, arena_bytes, label, stream)

    def install_router(self, router: Callable[[int], Any]) -> None:
        cupy.cuda.set_allocator(router)

    def route_memory(self, stream: RawStream) -> object:
        memory = stream.memory if type(stream) is CudaStream else None
        torch = torch_ready() if memory is not None else None
        if torch is None or memory is None:
            return None
        return (memory, memory.enter(torch))

    def unroute_memory(self, token: object) -> None:
        if token is not None:
            memory: TorchMemory
            routed: Any
            memory, routed = token  # type: ignore[misc]
            memory.leave(sys.modules["torch"], routed)

    def bind_stream(self, stream: RawStream | None, *, route: bool = True) -> object:
        # not isinstance: this runs at every task step
        ours = stream if type(stream) is CudaStream else None
        own = ours is not None
        torch: Any = sys.modules.get("torch")
        governed = torch_ready() if torch is not None else None
        torch_on = governed is not None or (torch is not None and torch.cuda.is_initialized())
        # Several devices: binding our stream makes our device current (CuPy and PyTorch
        # allocate and launch there), and PyTorch's set_stream makes its stream's device
        # current; either way the thread's device comes back at restore_stream.
        back = _rt.getDevice() if self._several and (own or torch_on) else None
        here = self.device_id if own else back  # the device of the stream saved as prev
        if own and back is not None and back != self.device_id:
            _rt.setDevice(self.device_id)
        memory = routed = torch_prev = None
        try:
            prev = cupy.cuda.get_current_stream()
            torch_prev = torch.cuda.current_stream(self.device_id) if torch_on else None
            if ours is not None:
                if ours.cp is not prev:
                    ours.cp.use()
                if torch_on:
                    torch.cuda.set_stream(ours.torch_stream())
                    memory = ours.memory if governed is not None and route else None
                    if memory is not None:  # its allocations charged to the context
                        routed = memory.enter(torch)
            elif prev.ptr in self._ours:
                # Another task's session binding is still on this thread: a task outside
                # any session must not run on it. (A stream the user chose is kept.)
                cupy.cuda.Stream.null.use()
                if torch_on:
                    torch.cuda.set_stream(torch.cuda.default_stream(self.device_id))
        except BaseException:
            if torch_prev is not None:
                torch.cuda.set_stream(torch_prev)
            if back is not None:
                _rt.setDevice(back)
            raise
        return (prev, torch_prev, back, here, memory, routed)

    def restore_stream(self, token: object) -> None:
        prev: Any
        torch_prev: Any
        back: int | None
        here: int | None
        memory: TorchMemory | None
        routed: Any
        prev, torch_prev, back, here, memory, routed = token  # type: ignore[misc]
        try:
            if memory is not None:
                memory.leave(sys.modules["torch"], routed)
        finally:
            self._restore(prev, torch_prev, back, here)

    def _restore(self, prev: Any, torch_prev: Any, back: int | None, here: int | None) -> None:
        if back is not None and _rt.getDevice() != here:
            _rt.setDevice(here)  # the step switched devices; prev is a stream of `here`
        if cupy.cuda.get_current_stream() is not prev:
            prev.use()
        if torch_prev is not None:
            sys.modules["torch"].cuda.set_stream(torch_prev)  # makes its device current
        if back is not None and _rt.getDevice() != back:
            _rt.setDevice(back)

    def fault(self, streams: list[RawStream]) -> BaseException | None:
        if not getattr(self._local, "device_set", False):
            _rt.setDevice(self.device_id)
            self._local.device_set = True
        for s in streams:
            if s.capturing:
                continue  # being captured: a query would invalidate the capture
            status = relaxed(_rt.streamQuery, s.handle)
            if status not in (0, NOT_READY):
                return CudaError(
                    f"the CUDA context faulted: error {status} ({error_name(status)}); "
                    "pending GPU work will never complete — restart the process",
                    status=status,
                )
        return None

    @property
    def xp(self) -> Any:
        return cupy

    def alloc_raw(self, nbytes: int) -> Any:
        with translated():
            return SHARED.malloc(self.device_id, nbytes)

    def copy_to_host(self, buf: Any, nbytes: int) -> Any:
        import numpy as np

        with translated(), cupy.cuda.Device(self.device_id):
            pinned = cupy.cuda.alloc_pinned_memory(nbytes)
            host = np.frombuffer(pinned, dtype=np.uint8, count=nbytes)
            _rt.memcpy(host.ctypes.data, buf.ptr, nbytes, _rt.memcpyDeviceToHost)
        return host

    def copy_from_host(self, buf: Any, host: Any, nbytes: int) -> None:
        import numpy as np

        arr = np.frombuffer(host, dtype=np.uint8, count=nbytes)
        with translated(), cupy.cuda.Device(self.device_id):
            _rt.memcpy(buf.ptr, arr.ctypes.data, nbytes, _rt.memcpyHostToDevice)

    def array_to_host(self, array: Any, out: Any = None) -> Any:
        import numpy as np

        array = cupy.ascontiguousarray(array)
        if out is None or out.shape != array.shape or out.dtype != array.dtype:
            pinned = cupy.cuda.alloc_pinned_memory(array.nbytes)
            out = np.frombuffer(pinned, dtype=array.dtype, count=array.size).reshape(array.shape)
        with translated(), cupy.cuda.Device(self.device_id):
            _rt.memcpy(out.ctypes.data, array.data.ptr, array.nbytes, _rt.memcpyDeviceToHost)
        return out

    def array_from_host(self, host: Any) -> Any:
        with translated(), cupy.cuda.Device(self.device_id):
            out = cupy.empty(host.shape, dtype=host.dtype)  # routed: charged to the context
            # On the stream the memory was allocated for: until that stream's earlier work
            # has run, the block may still be in use by the work of its previous owner.
            stream = cupy.cuda.get_current_stream()
            _rt.memcpyAsync(
                out.data.ptr, host.ctypes.data, host.nbytes, _rt.memcpyHostToDevice, stream.ptr
            )
            stream.synchronize()
        return out

    def capture(self, stream: RawStream, fn: Callable[[], object]) -> CudaGraph:
        assert isinstance(stream, CudaStream)
        route = cupy.cuda.get_allocator()
        keep: list[Any] = []

        def hold(nbytes: int) -> Any:
            # Kept alive with the graph: a block freed during capture and handed to later
            # work would be overwritten by every replay.
            mem = route(nbytes)
            keep.append(mem)
            return mem

        token = self.bind_stream(stream)
        torch = torch_ready() if stream.memory is not None else None
        try:
            with contextlib.ExitStack() as scope:
                scope.enter_context(translated())
                scope.enter_context(cupy.cuda.using_allocator(hold))
                if torch is not None and stream.memory is not None:
                    # PyTorch's allocations go to a pool of the graph's own, kept with it
                    keep.append(scope.enter_context(stream.memory.capturing(torch)))
                # The watchdog and the completion spin query streams from other threads:
                # they see a capturing stream as busy instead of querying it.
                with stream.capture_lock:
                    stream.capturing = True
                    stream.cp.begin_capture()
                try:
                    fn()
                except BaseException:
                    try:
                        stream.cp.end_capture()
                    except _rt.CUDARuntimeError:
                        pass  # fn's own error is the one to report
                    raise
                graph = stream.cp.end_capture()
        finally:
            stream.capturing = False
            self.restore_stream(token)
            SHARED.free_deferred()
        return CudaGraph(graph, keep)

    def synchronize(self) -> None:
        with translated(), cupy.cuda.Device(self.device_id):
            _rt.deviceSynchronize()

    def close(self) -> None:
        self._closed = True
        # later allocations (a closed runtime stays CuPy's allocator) use cudaMalloc
        if self._book is not None:
            self._book.set_pool(0)
        self._pool.close()


def _device_count_impl() -> int:
    return int(_rt.getDeviceCount())


def _priority_range() -> tuple[int, int]:
    """``(least, greatest)`` stream priority of the current context, from the driver."""
    lib = ctypes.CDLL("libcuda.so.1")
    least, greatest = ctypes.c_int(), ctypes.c_int()
    status = lib.cuCtxGetStreamPriorityRange(ctypes.byref(least), ctypes.byref(greatest))
    if status != 0:
        raise CudaError(f"cuCtxGetStreamPriorityRange failed: {status}", status=status)
    return least.value, greatest.value


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


backend_class = CudaBackend
