"""Where finished waiters' tokens arrive: a ring and an fd an event loop can watch.

A backend's completion signal pushes a token; the loop that sees the fd readable drains
every token pushed so far. The compiled channel (``_cbridge.c``) pushes from a host
function that never takes the GIL; the Python one is the fallback for builds without it.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable
from typing import Any, Protocol

from .._exceptions import InvalidArgument

__all__ = ("CAPACITY", "Channel", "claim", "make_channel")

CAPACITY = 1 << 18  # live waiters at most; the ring holds exactly this many


class Channel(Protocol):
    """What a completion bridge drains. ``native`` and ``push`` are the backends' side of it
    (the ``Signal`` protocol of ``_backends``); ``fd`` is readable while tokens wait."""

    native: Any
    fd: int

    def push(self, slot: int) -> None: ...
    def drain(self) -> list[int]: ...


class NativeChannel:
    """The compiled ring: host functions that never take the GIL.

    The ring is static in the extension, so there is one per process and one bridge owns it.
    """

    owned = False

    def __init__(self, module: Any) -> None:
        self.native = module
        self.fd: int = module.open(CAPACITY)
        self.push: Callable[[int], None] = module.notify
        self.drain: Callable[[], list[int]] = module.drain


class PythonChannel:
    """The fallback when the extension is not built: same shape, GIL-taking producers."""

    native = None

    def __init__(self) -> None:
        self._slots: collections.deque[int] = collections.deque()
        if hasattr(os, "eventfd"):
            self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._wfd = self.fd
        else:  # pragma: no cover - non-Linux
            self.fd, self._wfd = os.pipe()
            os.set_blocking(self.fd, False)

    def push(self, slot: int) -> None:
        self._slots.append(slot)  # deque.append is atomic under the GIL
        os.write(self._wfd, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    def drain(self) -> list[int]:
        try:
            os.read(self.fd, 4096)
        except BlockingIOError:
            pass
        out = []
        pop = self._slots.popleft
        while True:
            try:
                out.append(pop())
            except IndexError:
                return out


def claim(channel: Channel) -> None:
    """Give ``channel`` to the bridge being made.

    :raises InvalidArgument: it is the native channel, and another bridge has it already
    """
    if getattr(channel, "owned", False):
        raise InvalidArgument(
            "the native completion channel is process-wide and already has its bridge; "
            "use default_bridge()"
        )
    if isinstance(channel, NativeChannel):
        channel.owned = True


_native_channel: NativeChannel | None = None


def make_channel(kind: str = "auto") -> Channel:
    """A channel of ``kind``: ``"native"``, ``"python"``, or ``"auto"`` (native when it is
    built; ``PYGPUKIT_BRIDGE`` chooses).

    :raises ImportError: ``"native"`` was asked for and the extension is not built
    """
    if kind == "auto":
        kind = os.environ.get("PYGPUKIT_BRIDGE", "auto").strip().lower() or "auto"
    global _native_channel
    if kind in ("auto", "native"):
        try:
            # (by its full name: ``from . import`` reads as an import of the package's face)
            import pygpukit.runtime._cbridge as _cbridge  # type: ignore[import-not-found]
        except ImportError:
            if kind == "native":
                raise
        else:
            if _native_channel is None:
                _native_channel = NativeChannel(_cbridge)
            return _native_channel
    return PythonChannel()
