"""The completion watchdog: no await hangs on a faulted device or a batch nobody sends.

Host functions are not called once a CUDA context has faulted, so while waiters are
pending a thread looks every ``interval``: it fails the waiters of a faulted device with
the device's error, and sends the batches whose sender has not (the stranded-batch rule).
The first error it finds on each device is kept (:attr:`Watchdog.faults`): a runtime's
health is read from there without asking the device again.
"""

from __future__ import annotations

import copy
import logging
import threading
import weakref
from typing import TYPE_CHECKING

from .._exceptions import CudaError
from ._slots import resolve_all

if TYPE_CHECKING:
    from ._backends import Backend, RawStream
    from ._batches import Batch, Batches
    from ._slots import SlotTable

__all__ = ("Watchdog",)

_log = logging.getLogger("pygpukit")
_stop = threading.Event()


class Watchdog:
    """Looks at a slot table's waiters and its open batches; its thread starts on demand."""

    def __init__(
        self, slots: SlotTable, batches: Batches, wake: threading.Event, interval: float
    ) -> None:
        """:param wake: set while there may be something to look at; cleared by the thread
        (under the table's lock) when there is nothing
        :param interval: seconds between looks
        """
        self._slots = slots
        self._batches = batches
        self._lock = slots.lock
        self._wake = wake
        self._interval = interval
        self._thread: threading.Thread | None = None
        #: the first error found on each backend's device (a faulted CUDA context stays
        #: faulted), as a copy: weak keys, so that the process-wide bridge does not keep a
        #: closed runtime's backend alive
        self.faults: weakref.WeakKeyDictionary[Backend, BaseException]
        self.faults = weakref.WeakKeyDictionary()

    def start(self) -> None:
        """Start the thread unless it runs already, and have it look."""
        self._wake.set()
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="pygpukit-completion-watchdog", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        slots, unsent = self._slots, self._batches.unsent
        while True:
            self._wake.wait()
            _stop.wait(self._interval)
            if _stop.is_set():
                return
            with self._lock:
                if not slots.live and not unsent:  # asleep until the next waiter
                    self._wake.clear()  # (SlotTable.add sets the flag again)
                    continue
            try:
                self.send_stranded()
                self.check_faults()
            except BaseException:  # never let the watchdog die: pending awaits rely on it
                _log.exception("the completion watchdog's fault check failed; it goes on")

    def send_stranded(self) -> None:
        """Send the open batches that were open at the last look already, or whose loop is
        not running: whoever would send them has not, and may not (a loop blocked in one
        iteration, a launcher thread stuck in a function). Sending early is safe — the
        signal still lands after every member's work — except into a stream we are
        capturing into a graph: the signal would become a node of the graph, so a stream's
        batch waits for the capture's end. (A held batch's signal goes on a companion
        stream behind its event, never into the captured stream.) Each batch is sent
        whatever sending another raised; a ``KeyboardInterrupt`` or the like from a
        member's callback is raised again once all are sent."""
        batches = self._batches
        with self._lock:
            stranded: list[Batch] = []
            for batch in batches.unsent:
                if getattr(batch.target, "capturing", False):
                    continue
                loop = batch.loop
                if batch.seen or (loop is not None and not loop.is_running()):
                    stranded.append(batch)
                else:
                    batch.seen = True
            for batch in stranded:
                batches.close(batch)
        interrupt: BaseException | None = None
        for batch in stranded:  # closed: if one were skipped, no one would ever send it
            try:
                batches.send(batch)
            except BaseException as exc:
                interrupt = interrupt or exc
        if interrupt is not None:
            raise interrupt

    def check_faults(self) -> int:
        """Fail every pending waiter whose device has faulted; returns how many.

        The device is asked once per stream that waiters wait on, not once per waiter: with
        tens of thousands in flight a look every ``interval`` must stay cheap, as it holds
        the GIL.
        """
        slots = self._slots
        with self._lock:
            probes = list(slots.probes.values())
        by_backend: dict[Backend, list[RawStream]] = {}
        for probe in probes:
            streams = by_backend.setdefault(probe.backend, [])
            if probe.stream is not None:
                streams.append(probe.stream)
        del probes
        failed = 0
        for backend, streams in by_backend.items():
            try:
                error = backend.fault(streams)
            except Exception as exc:  # a query that itself fails is a fault too
                error = exc
            if error is None:
                continue
            with self._lock:  # every waiter on the faulted device
                if backend not in self.faults:  # before any waiter hears of it
                    self.faults[backend] = _detached(error)
                doomed = slots.fail(backend)
            resolve_all(doomed, error)
            failed += len(doomed)
        return failed


def _detached(error: BaseException) -> BaseException:
    """A copy of ``error`` without traceback, cause or context. The error itself is raised
    in every waiter, and its traceback then holds their frames, which may hold the backend:
    kept as a weak key's value, it would keep that key alive."""
    try:
        return copy.copy(error)
    except Exception:  # an error type that copy cannot rebuild
        return CudaError(str(error) or repr(error))
