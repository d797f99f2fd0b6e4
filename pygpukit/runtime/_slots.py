"""The waiter table: a slot for each pending waiter, named by tokens that cannot go stale.

A waiter takes a free slot and its completion signal carries a *token*: the slot's
generation in its high bits, the slot in its low ones. A slot emptied before its signal
came (its waiter failed by the watchdog, or its arming undone) moves to a new generation,
so a late signal for it is recognised and ignored instead of resolving the slot's next
waiter.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._exceptions import PygpukitError
from ._channel import CAPACITY

if TYPE_CHECKING:
    from ._backends import Backend, RawStream

__all__ = ("Callback", "Probe", "SlotTable", "resolve_all")

_GEN_SHIFT = CAPACITY.bit_length() - 1  # a token: generation << _GEN_SHIFT | slot
_SLOT = CAPACITY - 1

#: what a waiter is resolved with: ``None`` once its work has run, else the error
Callback = Callable[[BaseException | None], None]

_log = logging.getLogger("pygpukit")


class Probe:
    """A stream (or, for an event never recorded, a backend) with waiters pending on it:
    what the watchdog queries for faults. Shared by those waiters' slots."""

    __slots__ = ("backend", "count", "key", "stream")

    def __init__(self, key: object, backend: Backend, stream: RawStream | None) -> None:
        self.key = key  # what the table files it under: its stream, else its backend
        self.backend = backend
        self.stream = stream
        self.count = 0


class SlotTable:
    """The pending waiters, their callbacks and what each waits on; ``lock`` guards it all.

    The table is parallel lists indexed by slot, grown on demand up to ``CAPACITY``. A
    pending await allocates nothing here (no per-waiter object for the garbage collector to
    count and traverse: docs/adr/0028); a free slot holds ``None``.
    """

    def __init__(self, drain: Callable[[], list[int]], wake: threading.Event) -> None:
        """:param drain: the channel's: every token signalled since the last call
        :param wake: set when the table goes from no waiter to one (the watchdog's flag)
        """
        self.lock = threading.Lock()
        self._drain = drain
        self._drain_lock = threading.Lock()
        self._wake = wake
        self._resolve: list[Callback | None] = []
        self._probe: list[Probe | None] = []  # what each slot's waiter waits on
        self._rest: list[list[int] | None] = []  # the other waiters a slot's signal stands for
        self._gen: list[int] = []  # per slot: bumped when a slot is emptied before its signal
        self._free: list[int] = []
        #: by stream: the watchdog's worklist; empty exactly when no waiter is pending
        self.probes: dict[object, Probe] = {}
        self.live = 0  # waiters pending
        self.armed = 0  # waiters registered, ever

    def add(
        self, resolve: Callback, backend: Backend, stream: RawStream | None
    ) -> tuple[int, Probe]:
        """Take a slot for ``resolve`` (call with the lock held); its token and its probe.

        :raises PygpukitError: ``CAPACITY`` waiters are pending already
        """
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self._resolve[slot] = resolve
        key = backend if stream is None else stream
        probe = self.probes.get(key)
        if probe is None:
            probe = self.probes[key] = Probe(key, backend, stream)
        probe.count += 1
        self._probe[slot] = probe
        self.live += 1
        self.armed += 1
        if self.live == 1:
            # The watchdog clears its wake-up flag under this lock once nothing is pending:
            # the first waiter after that sets it again.
            self._wake.set()
        return self._gen[slot] << _GEN_SHIFT | slot, probe

    def _grow(self) -> None:
        """Double the table (call with the lock held).

        :raises PygpukitError: ``CAPACITY`` waiters are pending already
        """
        size = len(self._resolve)
        if size >= CAPACITY:
            raise PygpukitError(
                f"more than {CAPACITY} GPU completions are awaited at once; await "
                "fewer at a time (e.g. gather in batches)"
            )
        more = min(max(size, 1024), CAPACITY - size)
        self._resolve.extend([None] * more)
        self._probe.extend([None] * more)
        self._rest.extend([None] * more)
        self._gen.extend([0] * more)
        self._free.extend(range(size + more - 1, size - 1, -1))  # lowest slots first

    def lead(self, tokens: list[int]) -> int:
        """Let the newest of ``tokens`` whose waiter is still pending stand for all of them
        (call with the lock held): its signal resolves the others first, in their order.
        That token, or -1 when none is pending (the watchdog failed them meanwhile)."""
        gens = self._gen
        live = [t for t in tokens if t >> _GEN_SHIFT == gens[t & _SLOT]]
        if not live:
            return -1
        lead = live.pop()
        self._rest[lead & _SLOT] = live or None
        return lead

    def release(self, token: int) -> None:
        """Take back the slot ``token`` names, unless its waiter is gone already (the
        watchdog failed it, and the slot may be another waiter's now). The slot moves to a
        new generation: a signal already queued for ``token`` resolves nothing."""
        with self.lock:
            self.retire(token)

    def retire(self, token: int) -> Callback | None:
        """Empty ``token``'s slot under a new generation, if it is still that waiter's (call
        with the lock held); its callback, or ``None``."""
        slot = token & _SLOT
        if token >> _GEN_SHIFT != self._gen[slot]:
            return None
        return self._empty(slot)

    def fail(self, backend: Backend) -> list[Callback]:
        """Empty the slot of every waiter on ``backend`` under a new generation (call with
        the lock held): their signals will never come on a faulted device, and if one does,
        it is ignored. Their callbacks."""
        doomed = []
        for slot, on in enumerate(self._probe):
            if on is not None and on.backend is backend:
                resolve = self._empty(slot)
                if resolve is not None:
                    doomed.append(resolve)
        return doomed

    def _empty(self, slot: int) -> Callback | None:
        """:meth:`_take` ``slot`` and move it to a new generation (call with the lock held)."""
        resolve = self._take(slot)
        self._gen[slot] += 1
        return resolve

    def _take(self, slot: int) -> Callback | None:
        """Empty ``slot`` (call with the lock held); its callback, or ``None``."""
        resolve = self._resolve[slot]
        if resolve is not None:
            self._resolve[slot] = None
            self._rest[slot] = None
            probe = self._probe[slot]
            self._probe[slot] = None
            assert probe is not None  # a slot with a callback has its probe
            probe.count -= 1
            if not probe.count:
                del self.probes[probe.key]
            self._free.append(slot)
            self.live -= 1
        return resolve

    def on_readable(self) -> None:
        """Resolve every waiter whose signal has come (the channel's fd is readable)."""
        with self._drain_lock:
            tokens = self._drain()
        if not tokens:
            return
        done = []
        gens, rests, take = self._gen, self._rest, self._take
        with self.lock:
            size = len(gens)
            for token in tokens:
                slot = token & _SLOT
                if slot >= size or token >> _GEN_SHIFT != gens[slot]:
                    continue  # no waiter of ours, or one failed and its slot reused
                rest = rests[slot]
                if rest is not None:  # the members this signal was shared by, in order
                    for other in rest:
                        if other >> _GEN_SHIFT == gens[other & _SLOT]:
                            resolve = take(other & _SLOT)
                            if resolve is not None:
                                done.append(resolve)
                resolve = take(slot)  # the last member
                if resolve is not None:
                    done.append(resolve)
        resolve_all(done, None)


def resolve_all(callbacks: list[Callback], error: BaseException | None) -> None:
    """Call every callback, whatever one of them raises: a waiter left out would wait
    forever. An exception is logged; a ``KeyboardInterrupt`` or the like is raised again
    once the rest have run."""
    interrupt: BaseException | None = None
    for resolve in callbacks:
        try:
            resolve(error)
        except Exception:
            _log.exception("a GPU-completion callback raised; the other waiters are unaffected")
        except BaseException as exc:
            interrupt = interrupt or exc
    if interrupt is not None:
        raise interrupt
