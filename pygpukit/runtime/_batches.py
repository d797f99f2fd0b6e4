"""Waiters that share one completion signal: batches, from open to sent.

A batch lists its members' tokens in the order they joined; its one signal carries the
newest pending member's token, and that slot lists the others, so the drain resolves them
all, in order. Two kinds: a stream's batch of awaits, sent when its asyncio loop finishes
the iteration (``CompletionBridge.on_done`` with ``share``), and a batch a holder keeps for
work it launches back to back (``CompletionBridge.hold``: the launcher threads).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ._slots import Probe, SlotTable, resolve_all

if TYPE_CHECKING:
    from ._backends import RawEvent, RawStream, Signal

__all__ = ("Batch", "Batches")


class Batch:
    """Waiters that will share one completion signal: their tokens in arming order, and
    where the signal goes — behind ``target``, a stream (its end when the batch is sent) or
    the event of the last member to join. Open until sent; made and changed under the
    slot table's lock.

    A stream's batch of awaits has ``loop`` (the asyncio loop whose current iteration's end
    sends it) and ``probe`` (the stream's: :attr:`Batches.shared` files the batch under it);
    a held batch has neither. Either is sent when ``cap`` members have joined, and by the
    watchdog if it is still open at the watchdog's second look at it (``seen``)."""

    __slots__ = ("cap", "loop", "open", "probe", "seen", "target", "tokens")

    def __init__(
        self,
        target: RawStream | RawEvent,
        cap: int,
        probe: Probe | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.tokens: list[int] = []
        self.target = target
        self.cap = cap
        self.probe = probe
        self.loop = loop
        self.open = True
        self.seen = False


class Batches:
    """The open batches of one slot table, and the signals sent for batches."""

    def __init__(self, slots: SlotTable, signal: Signal) -> None:
        """:param signal: what a batch's signal is enqueued with (the channel)"""
        self._lock = slots.lock
        self._lead = slots.lead
        self._retire = slots.retire
        self._signal = signal
        #: the open batches, in the order they were opened (for the watchdog)
        self.unsent: dict[Batch, None] = {}
        #: a stream's open batch of awaits, by the stream's probe
        self.shared: dict[Probe, Batch] = {}
        self.joined = 0  # waiters that joined a batch rather than get a signal, ever
        self.sent = 0  # signals enqueued for batches, ever

    def open(self, batch: Batch) -> Batch:
        """``batch``, new, filed where the watchdog sees it (call with the lock held)."""
        self.unsent[batch] = None
        if batch.probe is not None:
            self.shared[batch.probe] = batch
        return batch

    def join(self, batch: Batch, token: int) -> Batch | None:
        """Add ``token`` to ``batch`` (call with the lock held); the batch, closed, when that
        filled it and the caller must send it."""
        batch.tokens.append(token)
        self.joined += 1
        if len(batch.tokens) < batch.cap:
            return None
        self.close(batch)
        return batch

    def close(self, batch: Batch) -> None:
        """No more members for ``batch``: it is about to be sent (call with the lock held)."""
        batch.open = False
        self.unsent.pop(batch, None)
        probe = batch.probe
        if probe is not None and self.shared.get(probe) is batch:
            del self.shared[probe]

    def send(self, batch: Batch) -> None:
        """Enqueue one signal behind ``batch``'s target (the batch closed) for its members
        still pending. If it cannot be enqueued, every one of them gets the error."""
        target = batch.target
        with self._lock:
            lead = self._lead(batch.tokens)
            if lead < 0:
                return  # every one failed by the watchdog meanwhile
            self.sent += 1
        try:
            target.signal_when_done(lead, self._signal)
        except BaseException as exc:  # a faulted or closed stream: every waiter hears it
            error: BaseException | None = exc
            if isinstance(exc, Exception):
                try:  # closed after its work ran (close() waits for it): all done, then
                    error = None if target.query() else exc
                except Exception:
                    pass
            with self._lock:  # (a member failed meanwhile is left be: retire skips it)
                doomed = [self._retire(token) for token in batch.tokens]
            resolve_all([resolve for resolve in doomed if resolve is not None], error)
            if error is not None and not isinstance(error, Exception):
                raise
