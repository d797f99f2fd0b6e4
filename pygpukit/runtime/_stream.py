"""Streams and events: the public handles over a backend's raw ones.

Both are awaitable: ``await stream`` resolves when the work enqueued on it so far has run,
``await event`` when the work before its last record has. Neither blocks the event loop.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar

from .._exceptions import InvalidArgument

if TYPE_CHECKING:
    from ._backends import Backend, RawEvent, RawStream
    from ._completion import CompletionBridge

__all__ = ("Event", "HandleState", "Stream")


class HandleState(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"


_Raw = TypeVar("_Raw", "RawStream", "RawEvent")


class _Handle(Generic[_Raw]):
    """A public handle over a backend's raw one: made by the runtime, never by its
    constructor, awaitable, and closed once (``state`` tells which)."""

    __slots__ = ("__weakref__", "_backend", "_bridge", "_raw", "state")
    _backend: Backend
    _bridge: CompletionBridge
    _raw: _Raw
    state: HandleState
    #: the calls that make one, named by the constructor's error
    _made_by: ClassVar[str]
    #: what to do instead of using a closed one, named by its error
    _instead: ClassVar[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            f"{type(self).__name__} objects cannot be instantiated directly; use {self._made_by}"
        )

    @classmethod
    def _wrap(cls, raw: _Raw, backend: Backend, bridge: CompletionBridge) -> Self:
        self = object.__new__(cls)
        self._raw = raw
        self._backend = backend
        self._bridge = bridge
        self.state = HandleState.OPEN
        return self

    @property
    def id(self) -> int:
        """The raw handle (``cudaStream_t`` or ``cudaEvent_t`` on CUDA); unique among live
        handles of its kind."""
        return self._raw.handle

    def _open(self) -> _Raw:
        if self.state is HandleState.CLOSED:
            raise InvalidArgument(f"{self!r} is closed; {self._instead}")
        return self._raw

    def __await__(self) -> Generator[Any, None, None]:
        return self._bridge.wait(self._open(), self._backend).__await__()

    def close(self) -> None:
        """Release the handle, once a stream's work has run; idempotent."""
        if self.state is HandleState.OPEN:
            self.state = HandleState.CLOSED
            self._raw.close()


class Stream(_Handle["RawStream"]):
    """An in-order queue of device work with a priority (lower number = higher priority).

    Streams come from :meth:`Runtime.create_stream` or belong to a context
    (``get_stream(ctx)``); they cannot be constructed directly.
    """

    __slots__ = ()
    _made_by = "Runtime.create_stream() or get_stream(ctx)"
    _instead = "use an open stream"

    ptr = _Handle.id

    @property
    def priority(self) -> int:
        return self._raw.priority

    @property
    def backend(self) -> str:
        return self._backend.name

    @property
    def raw(self) -> RawStream:
        """The backend's stream (a ``cupy.cuda.Stream`` is ``stream.raw.cp`` on CUDA)."""
        return self._raw

    def synchronize(self) -> None:
        """Block the calling thread until the stream's work has run (prefer ``await``)."""
        self._raw.synchronize()

    def query(self) -> bool:
        """``True`` when all work enqueued so far has run."""
        return self._raw.query()

    @property
    def done(self) -> bool:
        return self._raw.query()

    def record(self, event: Event | None = None) -> Event:
        """Record ``event`` (a new one if ``None``) at the current end of this stream."""
        if event is None:
            event = Event._wrap(self._backend.create_event(), self._backend, self._bridge)
        elif not isinstance(event, Event):
            raise InvalidArgument(
                f"record() takes a pygpukit Event, not {type(event).__name__}; "
                "call stream.record() with no argument to get a new one"
            )
        self._open().record(event._open())
        return event

    def wait_event(self, event: Event) -> None:
        """Make later work on this stream wait for ``event``; the host does not block."""
        if not isinstance(event, Event):
            raise InvalidArgument(
                f"wait_event() takes a pygpukit Event, not {type(event).__name__}; "
                "get one from stream.record() or record_event(ctx)"
            )
        self._open().wait_event(event._open())

    def launch_host_func(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` on a host thread once the work before it has run."""
        self._open().launch_host_func(fn)

    def __cuda_stream__(self) -> tuple[int, int]:
        """The CUDA stream protocol: ``(version, cudaStream_t)``."""
        if self._backend.name != "cuda":
            raise TypeError("a host-backend stream is not a CUDA stream")
        return (0, self._raw.handle)

    def __repr__(self) -> str:
        return (
            f"<Stream id={self.id:#x} priority={self.priority} backend={self.backend} "
            f"state={self.state.value}>"
        )


class Event(_Handle["RawEvent"]):
    """A point in a stream; complete when the work recorded before it has run."""

    __slots__ = ()
    _made_by = "stream.record(), record_event(ctx) or Runtime.create_event()"
    _instead = "record a new event"

    def record(self, stream: Stream) -> Event:
        """Record this event at the current end of ``stream``."""
        return stream.record(self)

    def query(self) -> bool:
        return self._open().query()

    @property
    def done(self) -> bool:
        return self._open().query()

    def synchronize(self) -> None:
        """Block the calling thread until the event completes (prefer ``await``)."""
        self._open().synchronize()

    def elapsed_time(self, end: Event) -> float:
        """Milliseconds from this event to ``end``; both created with ``timing=True``."""
        return self._open().elapsed_ms(end._open())

    def __repr__(self) -> str:
        return f"<Event id={self.id:#x} backend={self._backend.name} state={self.state.value}>"
