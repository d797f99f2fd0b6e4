"""A value delivered once, from any thread, to the one task awaiting it (asyncio or trio)."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

__all__ = ("Oneshot", "running_library")


def running_library() -> str:
    """``"asyncio"`` (uvloop included) or ``"trio"``.

    :raises RuntimeError: no event loop is running in this thread
    """
    if asyncio._get_running_loop() is not None:
        return "asyncio"
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            return "trio"
    raise RuntimeError("awaiting GPU work needs a running asyncio (or uvloop) or trio loop")


class Oneshot:
    """Created by the awaiting task; :meth:`set` may be called from any thread, once."""

    __slots__ = ("_event", "_fut", "_loop", "_outcome", "_thread", "_token")

    def __init__(self) -> None:
        if running_library() == "asyncio":
            self._loop: Any = asyncio.get_running_loop()
            self._fut: Any = self._loop.create_future()
        else:
            import trio

            self._loop = None
            self._token = trio.lowlevel.current_trio_token()
            self._thread = threading.get_ident()
            self._event = trio.Event()
            self._outcome: tuple[Any, BaseException | None] | None = None

    def set(self, value: Any = None, exc: BaseException | None = None) -> None:
        """Deliver ``value`` (or raise ``exc`` in the waiter); later calls are ignored."""
        loop = self._loop
        if loop is not None:
            if asyncio._get_running_loop() is loop:
                self._settle(value, exc)
            else:
                try:
                    loop.call_soon_threadsafe(self._settle, value, exc)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass
        elif threading.get_ident() == self._thread:
            self._settle_trio(value, exc)
        else:
            import trio

            try:
                self._token.run_sync_soon(self._settle_trio, value, exc)
            except trio.RunFinishedError:
                pass

    def __call__(self, exc: BaseException | None) -> None:
        """As a completion callback (``on_done``): deliver ``None``, or raise ``exc``."""
        self.set(None, exc)

    def _settle(self, value: Any, exc: BaseException | None) -> None:
        fut = self._fut
        if not fut.done():
            if exc is None:
                fut.set_result(value)
            else:
                fut.set_exception(exc)
                fut.exception()  # a waiter that was cancelled meanwhile will never read it

    def _settle_trio(self, value: Any, exc: BaseException | None) -> None:
        if self._outcome is None:
            self._outcome = (value, exc)
            self._event.set()

    def done(self) -> bool:
        """Whether the value is already there (a wait will not suspend)."""
        if self._loop is not None:
            return bool(self._fut.done())
        return self._outcome is not None

    async def wait(self, *, again: bool = True) -> Any:
        """The value, once set. With ``again`` (the default) a cancelled wait (a timeout,
        say) leaves the value deliverable to a later wait; without it the wait is cheaper
        and a cancelled one is final."""
        if self._loop is not None:
            if again:
                return await asyncio.shield(self._fut)
            return await self._fut
        await self._event.wait()
        assert self._outcome is not None
        value, exc = self._outcome
        if exc is not None:
            raise exc
        return value
