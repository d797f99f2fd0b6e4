"""The contract every backend implements.

A backend is one device seen through one array library: CUDA through CuPy (``_cuda.py``)
or the host executor (``_host.py``). It makes streams and events, runs host functions in
stream order, allocates device memory through budgeted pools, and binds a stream as the
array library's current one for the calling thread. Nothing else in pygpukit touches CuPy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

__all__ = (
    "Backend",
    "CudaWarning",
    "DeviceInfo",
    "Grower",
    "RawEvent",
    "RawPool",
    "RawStream",
    "Shrinker",
    "Signal",
)


class CudaWarning(RuntimeWarning):
    """A device call failed where no exception can propagate: in a finalizer giving device
    memory back, or a pool's close. The device may have faulted; its memory is lost to the
    process until it exits."""


@dataclass(frozen=True)
class DeviceInfo:
    """What a device is; ``pygpukit info`` prints it.

    ``priority_range`` is ``(least, greatest)`` exactly as CUDA reports it: lower numbers are
    higher priorities, so on an H200 it reads ``(0, -5)``.
    """

    backend: str
    device_id: int
    name: str
    total_memory: int
    priority_range: tuple[int, int]
    multiprocessor_count: int
    compute_capability: str | None
    driver: str | None = None


class Signal(Protocol):
    """The completion bridge's producer side, handed to backends by the bridge.

    ``push(slot)`` marks a waiter slot done from any thread. ``native`` is the compiled
    ``_cbridge`` module when it is built (its ``launch(stream_ptr, slot)`` enqueues a host
    function that never takes the GIL), else ``None``.
    """

    native: Any

    def push(self, slot: int) -> None: ...


class RawEvent(ABC):
    """A backend event: a marker in a stream that completes when the work before it has run."""

    handle: int
    #: the stream it was last recorded on, where the backend tracks that (the stream the
    #: completion watchdog queries for faults while the event is awaited)
    origin: RawStream | None = None

    @abstractmethod
    def query(self) -> bool:
        """``True`` when the work before the last record has completed.

        :raises CudaError: the device faulted
        """

    @abstractmethod
    def synchronize(self) -> None:
        """Block the calling thread until the event has completed."""

    @abstractmethod
    def elapsed_ms(self, end: RawEvent) -> float:
        """Milliseconds between this event and ``end`` (both recorded with timing)."""

    @abstractmethod
    def signal_when_done(self, slot: int, signal: Signal) -> None:
        """Arrange for ``signal`` to receive ``slot`` once the event has completed."""

    @abstractmethod
    def close(self) -> None:
        """Release the handle; idempotent."""


class RawStream(ABC):
    """A backend stream: device work runs in the order it was enqueued."""

    handle: int
    priority: int
    #: work enqueued now is being recorded into a graph, not run: the watchdog and the
    #: completion spin must not query the stream (a query would invalidate the capture)
    capturing: bool = False

    @abstractmethod
    def synchronize(self) -> None:
        """Block the calling thread until every enqueued item has run."""

    @abstractmethod
    def query(self) -> bool:
        """``True`` when every enqueued item has run.

        :raises CudaError: the device faulted
        """

    @abstractmethod
    def record(self, event: RawEvent) -> None:
        """Record ``event`` at the current end of the stream."""

    @abstractmethod
    def wait_event(self, event: RawEvent) -> None:
        """Make later work on this stream wait for ``event`` (no host blocking)."""

    @abstractmethod
    def launch_host_func(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on a host thread once the work before it has run.

        On CUDA the call holds the stream until it returns and takes the GIL; keep it short.
        """

    @abstractmethod
    def signal_when_done(self, slot: int, signal: Signal) -> None:
        """Enqueue a completion signal for ``slot`` at the current end of the stream."""

    @abstractmethod
    def close(self) -> None:
        """Wait for the stream's work and release the handle; idempotent."""


Grower = Callable[[int], None]
"""Called by a pool before it takes ``n`` new bytes of device memory; raises to refuse."""

Shrinker = Callable[[int], None]
"""Called by a pool after it gave ``n`` bytes of device memory back."""


class RawGraph(ABC):
    """Device work recorded once from a function; :meth:`launch` enqueues all of it again."""

    @abstractmethod
    def launch(self, stream: RawStream) -> None:
        """Enqueue the recorded work on ``stream`` (one call, however many kernels)."""

    @abstractmethod
    def close(self) -> None:
        """Let go of the graph and the memory its work uses."""


class RawPool(ABC):
    """A context's allocator: serves the array library and reports what it holds.

    Every byte of device memory it takes is announced to ``grow`` first (which charges the
    budget and may refuse) and every byte it gives back is reported to ``shrink``.
    """

    def fast_malloc(self, nbytes: int) -> Any:
        """:meth:`malloc` without translating allocation errors (the router does that with
        :meth:`translate`); a pool may bind this to its allocator's own entry point."""
        return self.malloc(nbytes)

    def translate(self, exc: BaseException, nbytes: int) -> BaseException:
        """The error :meth:`malloc` raises for ``exc`` from :meth:`fast_malloc`."""
        return exc

    @abstractmethod
    def malloc(self, nbytes: int) -> Any:
        """Allocate ``nbytes`` for the array library (a CuPy ``MemoryPointer`` on CUDA)."""

    @abstractmethod
    def used_bytes(self) -> int:
        """Bytes in live allocations."""

    @abstractmethod
    def release_cached(self) -> None:
        """Give cached free blocks back to the device (reported through ``shrink``)."""

    def close(self) -> None:
        """Let go of reserved memory; it returns to the device when live arrays die."""
        self.release_cached()


class Backend(ABC):
    """One device seen through one array library."""

    name: ClassVar[str]
    device_id: int
    #: Whether a brief query loop can catch completions sooner than a sleep: true where the
    #: device runs without the GIL (CUDA), false on the host executor, whose work needs it.
    spin_helps: ClassVar[bool] = False
    #: Whether ``ctx.submit`` runs task functions as stream items (the host executor, whose
    #: execution units are the compute that stream priorities order) rather than on the
    #: context's launcher thread (CUDA, where the function only launches kernels).
    tasks_on_streams: ClassVar[bool] = False

    @abstractmethod
    def info(self) -> DeviceInfo:
        """Static facts about the device."""

    @abstractmethod
    def mem_get_info(self) -> tuple[int, int]:
        """``(free, total)`` device memory in bytes, as the device reports it now."""

    @abstractmethod
    def create_stream(self, priority: int) -> RawStream:
        """A new non-blocking stream with ``priority`` inside ``info().priority_range``."""

    @abstractmethod
    def create_event(self, *, timing: bool = False) -> RawEvent:
        """A new event; ``timing`` enables :meth:`RawEvent.elapsed_ms`."""

    @abstractmethod
    def create_pool(
        self,
        grow: Grower,
        shrink: Shrinker,
        arena_bytes: int = 0,
        label: str | None = None,
        stream: RawStream | None = None,
    ) -> RawPool:
        """A new allocator whose device memory is charged through ``grow``/``shrink``.

        With ``arena_bytes``, that much device memory is taken now and every allocation is
        carved from it (a Guaranteed context's physical reservation), on ``stream`` (the
        context's) where the backend orders allocations and frees by stream.
        """

    @abstractmethod
    def install_router(self, router: Callable[[int], Any]) -> None:
        """Route every array-library allocation in the process through ``router(nbytes)``."""

    def adopt(self, stream: RawStream, ledger: Any, account: Any, pool: RawPool) -> None:
        """A context was made on ``stream`` and ``pool``, charged to ``account`` in
        ``ledger``: charge there what other libraries allocate in its sessions and tasks
        too, where the backend can (CUDA: PyTorch). Nothing by default."""
        return None

    def route_memory(self, stream: RawStream) -> object:
        """Charge what other libraries allocate on this thread to the context that owns
        ``stream`` (what :meth:`bind_stream` does too, unless told ``route=False``), until
        :meth:`unroute_memory`; a token for it."""
        return None

    def unroute_memory(self, token: object) -> None:
        """Undo :meth:`route_memory`."""
        return None

    @abstractmethod
    def bind_stream(self, stream: RawStream | None, *, route: bool = True) -> object:
        """Make ``stream`` the array library's current stream on this thread, and its device
        the current device.

        ``None`` changes nothing but still saves the thread's current stream.

        :returns: a token for :meth:`restore_stream`
        """

    @abstractmethod
    def restore_stream(self, token: object) -> None:
        """Undo :meth:`bind_stream`."""

    @abstractmethod
    def fault(self, streams: list[RawStream]) -> BaseException | None:
        """The device's sticky error, if it has faulted, found by querying ``streams``."""

    @property
    @abstractmethod
    def xp(self) -> Any:
        """The array namespace whose allocations this backend's pools serve."""

    @abstractmethod
    def alloc_raw(self, nbytes: int) -> Any:
        """Unpooled device memory for :class:`pygpukit.lowlevel.MemoryPool` blocks."""

    @abstractmethod
    def copy_to_host(self, buf: Any, nbytes: int) -> Any:
        """A host copy (pinned where the backend has pinned memory) of ``buf``'s bytes."""

    @abstractmethod
    def copy_from_host(self, buf: Any, host: Any, nbytes: int) -> None:
        """Copy ``host`` bytes back into device ``buf``."""

    @abstractmethod
    def array_to_host(self, array: Any, out: Any = None) -> Any:
        """Copy a device array to host memory (pinned on CUDA), reusing ``out`` if given."""

    @abstractmethod
    def array_from_host(self, host: Any) -> Any:
        """A new device array (allocated through the router) holding ``host``'s bytes."""

    @abstractmethod
    def capture(self, stream: RawStream, fn: Callable[[], object]) -> RawGraph:
        """Record the device work ``fn`` enqueues on ``stream`` without running it.

        ``fn`` runs with ``stream`` as the current stream; the memory it allocates stays
        with the graph (the replays use the same buffers) until the graph is closed.
        """

    @abstractmethod
    def synchronize(self) -> None:
        """Block until all work on every stream of the device has run."""

    @abstractmethod
    def close(self) -> None:
        """Finish outstanding work; idempotent."""
