"""Admission per pipeline, for servers: a bounded number of a pipeline's requests run at
once, the others wait in arrival order, and a request that cannot finish before its deadline
is refused as soon as that is known, instead of slowing down the ones that can.

Why: a pipeline's requests share the device. Past the concurrency it serves efficiently,
each extra request slows every running one, so an overloaded server answers *all* of them
late (the example server with a 0.5 s timeout: 5 concurrent requests all finished, 10 all
missed). Holding the excess back keeps the admitted requests fast, and refusing those that
cannot be served in time gives their clients a 429 with ``Retry-After`` at once instead of a
504 after the whole timeout.

How:

- At most :attr:`Admission.limit` requests hold a slot. The limit adapts between 1 and
  ``max_in_flight`` as TCP's congestion window does: a request that misses its deadline (or
  is refused by a full queue further down) halves it, once a round (requests admitted
  before a cut do not cut it again); one that ends within ``headroom`` of the time it had,
  while others were waiting, raises it by ``1 / limit``: by one a round. It starts at
  ``initial_in_flight``. Past the concurrency the device serves side by side, more at once
  only take longer each; a ``headroom`` of a quarter of the time keeps serving from eating
  the time that waiting needs. (Doubling per round, as TCP's slow start, overshot: the
  requests let in by one raise ran slower than the estimate they were let in by.)
- ``service`` is how long a request held its slot lately (an exponentially weighted
  mean), and ``pace`` how long passed between slots freeing while requests waited (over
  a round of every slot at least, 64 at most). The ``n``-th in line expects a slot after
  ``n * pace`` seconds; a request whose expected finish, that wait plus ``service``, is
  past its deadline is refused with :class:`Overloaded`. The pace is the device's,
  whatever the limit, so a cut needs no time to take effect; until it was measured, no
  one is refused for the wait alone. Those waiting are judged again whenever a slot frees,
  and one that reaches the last moment it could start and still finish (its deadline less
  ``service``) gives up the same way.
- A free slot admits a request without judging it, so a wrong estimate cannot shut the
  pipeline out: each admitted request measures ``service`` afresh.
- At most ``max_waiting`` requests wait; more are refused at once.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import anyio
from pydantic import BaseModel

from .._exceptions import DeadlineExceeded, InvalidArgument, InvalidArgumentType, QueueFull
from ..pipeline import Pipeline, PipelineResult, PipelineStream, StageTiming
from ..runtime import QoSPolicy
from ..runtime.checks import check_deadline, check_number

__all__ = (
    "Admission",
    "AdmissionConfig",
    "AdmissionStatistics",
    "AdmittedPipeline",
    "AdmittedStream",
    "Overloaded",
    "RunOptions",
    "Slot",
)

#: weight of the newest hold time in the running mean of ``service``
_ALPHA = 0.2
#: the pace is measured over at most this many slots freed in a row (and at least over
#: ``limit + 2``: slots taken together tend to free together)
_PACE_WINDOW = 64


def _mean(mean: float | None, sample: float) -> float:
    return sample if mean is None else mean + _ALPHA * (sample - mean)


class Overloaded(QueueFull):
    """A request was refused by its pipeline's admission: it could not finish before its
    deadline behind the requests already admitted, or too many were waiting.

    :ivar pipeline: the pipeline's name
    :ivar running: requests holding a slot when it was refused
    :ivar waiting: requests waiting for one
    :ivar expected_s: seconds it would have taken (waiting plus serving); ``None`` when the
        waiting line was full
    :ivar left_s: seconds it had left before its deadline (``None``: it had none)
    :ivar retry_after_s: when a retry may find room, in seconds
    """

    def __init__(
        self,
        pipeline: str,
        running: int,
        waiting: int,
        expected_s: float | None,
        left_s: float | None,
        retry_after_s: float,
    ) -> None:
        self.pipeline = pipeline
        self.running = running
        self.waiting = waiting
        self.expected_s = expected_s
        self.left_s = left_s
        self.retry_after_s = retry_after_s
        self._init = (pipeline, running, waiting, expected_s, left_s, retry_after_s), {}
        head = f"pipeline {pipeline!r} is overloaded ({running} running, {waiting} waiting)"
        if expected_s is None:
            why = "and no more may wait"
        else:
            left = "none" if left_s is None else f"{max(0.0, left_s):.2f} s"
            why = f"and this request would take {expected_s:.2f} s, with {left} left"
        super().__init__(f"{head} {why}; retry after {retry_after_s:.1f} s")


def _count(value: object, what: str, low: int) -> int:
    if type(value) is not int:
        raise InvalidArgumentType(f"{what} must be an int, not {value!r}")
    if value < low:
        raise InvalidArgument(f"{what} must be at least {low}, got {value}")
    return value


@dataclass(frozen=True)
class AdmissionConfig:
    """How much of one pipeline a server admits at once.

    :ivar max_in_flight: the most requests that run at once, however well they go
    :ivar initial_in_flight: how many run at once before anything was measured
    :ivar max_waiting: requests that may wait for a slot; more are refused at once
    :ivar headroom: a request that ended within this share of the time it had (from its
        slot to its deadline) counts as room for one more
    """

    max_in_flight: int = 32
    initial_in_flight: int = 2
    max_waiting: int = 64
    headroom: float = 0.25

    def __post_init__(self) -> None:
        _count(self.max_in_flight, "max_in_flight", 1)
        _count(self.initial_in_flight, "initial_in_flight", 1)
        _count(self.max_waiting, "max_waiting", 0)
        check_number(self.headroom, "headroom", low=0.0, high=1.0, low_open=True)
        if self.initial_in_flight > self.max_in_flight:
            raise InvalidArgument(
                f"initial_in_flight ({self.initial_in_flight}) must not exceed max_in_flight "
                f"({self.max_in_flight})"
            )


@dataclass(frozen=True)
class AdmissionStatistics:
    """A snapshot of one :class:`Admission`.

    :ivar limit: requests that may run at once now
    :ivar running: requests holding a slot
    :ivar waiting: requests waiting for one
    :ivar service_s: how long a request held its slot lately (``None``: none ended yet)
    :ivar admitted: requests that got a slot, in all
    :ivar refused: requests refused (:class:`Overloaded`), in all
    :ivar late: admitted requests that missed their deadline, in all
    """

    limit: int
    running: int
    waiting: int
    service_s: float | None
    admitted: int
    refused: int
    late: int


class _Waiter:
    __slots__ = ("deadline", "granted", "refusal", "scope", "woken")

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.woken = anyio.Event()
        self.granted = False
        self.refusal: Overloaded | None = None
        #: ends the wait at the last moment the request could start and still finish
        self.scope = anyio.CancelScope()

    def give_up_at(self, service: float | None) -> None:
        """Move the end of the wait to ``deadline - service`` (``time.monotonic()`` times;
        the scope counts on the event loop's clock)."""
        if self.deadline is not None:
            latest = self.deadline - (service or 0.0)
            self.scope.deadline = anyio.current_time() + (latest - time.monotonic())


class Admission:
    """The admission of one pipeline's requests (see the module's docstring).

    Used from one event loop; ``async with admission.slot(deadline):`` around a request.

    :param name: the pipeline's name, for messages
    :param config: its bounds (default :class:`AdmissionConfig()`)
    """

    def __init__(self, name: str, config: AdmissionConfig | None = None) -> None:
        if config is not None and not isinstance(config, AdmissionConfig):
            raise InvalidArgumentType(f"config must be an AdmissionConfig, not {config!r}")
        self.name = name
        self.config = config or AdmissionConfig()
        self._limit = float(self.config.initial_in_flight)
        self._running = 0
        self._waiters: deque[_Waiter] = deque()
        self._service: float | None = None  # how long a request holds its slot lately
        # when slots freed lately, while requests were waiting all along
        self._frees: deque[float] = deque(maxlen=_PACE_WINDOW)
        self._pace: float | None = None  # seconds between them, once measured
        self._cut_at = -math.inf  # when the limit was last cut
        # slots whose holder was collected without releasing them; appended by finalizers
        # (on any thread), taken back on the loop at the next acquire
        self._abandoned: deque[None] = deque()
        self._admitted = self._refused = self._late = 0

    @property
    def limit(self) -> int:
        """Requests that may run at once now."""
        return max(1, int(self._limit))

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(
            self.limit,
            self._running,
            len(self._waiters),
            self._service,
            self._admitted,
            self._refused,
            self._late,
        )

    def slot(self, deadline: float | None = None) -> Slot:
        """A place for one request: ``async with admission.slot(deadline) as slot:``.

        :param deadline: a ``time.monotonic()`` time by which the request must finish
        :raises Overloaded: on entering: it cannot finish in time, or too many wait
        """
        return Slot(self, check_deadline(deadline))

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Admission {self.name!r} limit={s.limit} running={s.running} "
            f"waiting={s.waiting} service_s={s.service_s}>"
        )

    # -- the mechanism ----------------------------------------------------------------------
    def _refusal(self, ahead: int, deadline: float | None, now: float) -> Overloaded | None:
        """Why a request with ``ahead`` others before it cannot finish in time, if it can't
        (``None`` until the pace was measured: a guess refuses no one)."""
        pace = self._pace
        if deadline is None or pace is None or self._service is None:
            return None
        wait = (ahead + 1) * pace
        if now + wait + self._service <= deadline:
            return None
        return self._overloaded(wait + self._service, deadline - now, wait)

    def _overloaded(self, expected: float | None, left: float | None, wait: float) -> Overloaded:
        self._refused += 1
        return Overloaded(self.name, self._running, len(self._waiters), expected, left, wait)

    async def _acquire(self, deadline: float | None) -> float:
        """Wait for a slot; return when it was taken.

        :raises Overloaded: the request cannot finish in time, or too many wait
        """
        self._take_back_abandoned()
        now = time.monotonic()
        if not self._waiters and self._running < self.limit:
            self._running += 1
            self._admitted += 1
            return now
        if len(self._waiters) >= self.config.max_waiting:
            pace = self._pace or (self._service or 1.0) / self.limit
            raise self._overloaded(None, None, len(self._waiters) * pace)
        refusal = self._refusal(len(self._waiters), deadline, now)
        if refusal is not None:
            raise refusal
        waiter = _Waiter(deadline)
        waiter.give_up_at(self._service)
        self._waiters.append(waiter)
        try:
            with waiter.scope:
                await waiter.woken.wait()
        except BaseException:
            if waiter.granted:  # cancelled just as it got one: hand it on
                self._free()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        if waiter.granted:
            self._admitted += 1
            return time.monotonic()
        if waiter in self._waiters:  # its last moment to start has passed
            self._waiters.remove(waiter)
        if waiter.refusal is not None:
            raise waiter.refusal
        left = None if deadline is None else deadline - time.monotonic()
        raise self._overloaded(self._service, left, self._service or 0.0)

    def _release(self, start: float, deadline: float | None, outcome: str) -> None:
        """A request that held a slot since ``start`` ended: ``"ok"``, ``"late"`` (it missed
        its deadline), ``"congested"`` (a queue further down was full) or ``"other"``."""
        now = time.monotonic()
        held = now - start
        waiting = bool(self._waiters)
        if waiting:  # the pace at which slots free, measured while nobody is idle
            frees = self._frees
            frees.append(now)
            if len(frees) > self.limit + 1:  # a round of every slot, at least
                self._pace = (frees[-1] - frees[0]) / (len(frees) - 1)
        else:
            self._frees.clear()
        crowded = waiting or self._running >= self.limit
        if outcome in ("ok", "late"):
            # what serving took at this concurrency: the estimate every wait is judged by
            self._service = _mean(self._service, held)
        if outcome in ("late", "congested"):
            self._late += outcome == "late"
            if start >= self._cut_at:  # admitted since the last cut: one cut per round
                self._limit = max(1.0, self._limit / 2)
                self._cut_at = now
        elif outcome == "ok" and crowded:
            budget = None if deadline is None else deadline - start
            if budget is None or held <= self.config.headroom * budget:
                self._limit = min(float(self.config.max_in_flight), self._limit + 1 / self._limit)
        self._free()

    def _free(self) -> None:
        """One slot is free: hand slots to those waiting, in order, while the limit allows;
        refuse those that can no longer finish in time."""
        self._running -= 1
        now = time.monotonic()
        service = self._service
        kept: deque[_Waiter] = deque()
        while self._waiters:
            waiter = self._waiters.popleft()
            deadline = waiter.deadline
            if not kept and self._running < self.limit:  # it can start now
                if deadline is None or service is None or now + service <= deadline:
                    waiter.granted = True
                    self._running += 1
                else:
                    waiter.refusal = self._overloaded(service, deadline - now, service)
                waiter.woken.set()
                continue
            refusal = self._refusal(len(kept), deadline, now)
            if refusal is None:
                kept.append(waiter)
                waiter.give_up_at(service)  # the estimate may have changed
            else:
                waiter.refusal = refusal
                waiter.woken.set()
        self._waiters = kept

    def _take_back_abandoned(self) -> None:
        while self._abandoned:
            self._abandoned.popleft()
            self._free()


class Slot:
    """One request's place in an :class:`Admission` (from :meth:`Admission.slot`).

    Leaving the ``async with`` block frees it; how the block ended teaches the admission:
    normally (how long serving takes), by :class:`~pygpukit.DeadlineExceeded` or
    :class:`~pygpukit.QueueFull` (too many run at once), by another error or a
    cancellation (nothing).
    """

    __slots__ = ("__weakref__", "_admission", "_deadline", "_finalizer", "_start")

    def __init__(self, admission: Admission, deadline: float | None) -> None:
        self._admission = admission
        self._deadline = deadline
        self._start: float | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def deadline(self) -> float | None:
        return self._deadline

    async def __aenter__(self) -> Slot:
        if self._start is not None:
            raise RuntimeError("a Slot is entered once; take a new one with admission.slot()")
        self._start = await self._admission._acquire(self._deadline)
        # a holder dropped without leaving the block must not keep its slot forever
        self._finalizer = weakref.finalize(self, self._admission._abandoned.append, None)
        return self

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self.release(exc)

    def release(self, error: BaseException | None = None, *, early: bool = False) -> None:
        """Free the slot (idempotent; on the event loop).

        :param error: how the request failed, if it did
        :param early: the request was given up before it ended (closed, cancelled): its
            time says nothing about serving
        """
        if self._finalizer is None or not self._finalizer.detach():
            return
        assert self._start is not None
        if early or isinstance(error, anyio.get_cancelled_exc_class() | GeneratorExit):
            outcome = "other"
        elif error is None:
            outcome = "ok"
        elif isinstance(error, DeadlineExceeded):
            outcome = "late"
        elif isinstance(error, QueueFull):
            outcome = "congested"
        else:
            outcome = "other"
        self._admission._release(self._start, self._deadline, outcome)


class RunOptions(TypedDict, total=False):
    """What :meth:`Pipeline.run <pygpukit.pipeline.Pipeline.run>` takes besides the request."""

    tier: QoSPolicy | str | None
    priority: int
    deadline: float | None


class AdmittedPipeline:
    """A :class:`~pygpukit.pipeline.Pipeline` behind its :class:`Admission`: :meth:`run` and
    :meth:`stream` take a slot first (and may raise :class:`Overloaded`); everything else is
    the pipeline's own. With ``admission=None`` every request runs at once."""

    def __init__(self, pipeline: Pipeline, admission: Admission | None) -> None:
        self.pipeline = pipeline
        self.admission = admission

    async def run(
        self, request: BaseModel | Mapping[str, Any], **options: Unpack[RunOptions]
    ) -> PipelineResult:
        """:meth:`Pipeline.run <pygpukit.pipeline.Pipeline.run>` once admitted.

        :raises Overloaded: it could not finish before ``deadline``, or too many wait
        """
        slot: AbstractAsyncContextManager[Any] = nullcontext()
        if self.admission is not None:
            slot = self.admission.slot(options.get("deadline"))
        async with slot:
            return await self.pipeline.run(request, **options)

    def stream(
        self, request: BaseModel | Mapping[str, Any], **options: Unpack[RunOptions]
    ) -> AdmittedStream:
        """:meth:`Pipeline.stream <pygpukit.pipeline.Pipeline.stream>` once admitted; the
        slot is held until the stream ends or is closed."""
        deadline = options.get("deadline")
        slot = None if self.admission is None else self.admission.slot(deadline)
        return AdmittedStream(slot, lambda: self.pipeline.stream(request, **options))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipeline, name)

    def __repr__(self) -> str:
        return f"<AdmittedPipeline {self.pipeline!r} {self.admission!r}>"


class AdmittedStream:
    """A :class:`~pygpukit.pipeline.PipelineStream` that takes its slot when first used
    (:meth:`admit`, ``async with`` or the first ``async for`` step) and frees it when it ends
    or closes. Leave it through ``async with`` (or :meth:`aclose`) when stopping early."""

    def __init__(self, slot: Slot | None, start: Callable[[], PipelineStream]) -> None:
        self._slot = slot
        self._start = start
        self._stream: PipelineStream | None = None
        self._closed = False

    @property
    def timings(self) -> dict[str, StageTiming] | None:
        return None if self._stream is None else self._stream.timings

    async def _open(self) -> PipelineStream:
        if self._stream is None:
            if self._slot is not None:
                await self._slot.__aenter__()
            self._stream = self._start()
        return self._stream

    async def admit(self) -> AdmittedStream:
        """Take the slot now (idempotent). A server calls it before its response starts, so
        that a refusal is still answered with a status code (429), not an error line.

        :raises Overloaded: it could not finish before its deadline, or too many wait
        """
        await self._open()
        return self

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        stream = await self._open()
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            await self._end(None)
            raise
        except BaseException as exc:
            await self._end(exc)
            raise

    async def _end(self, error: BaseException | None, *, early: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._stream is not None:
                await self._stream.aclose()
        finally:
            if self._slot is not None:
                self._slot.release(error, early=early)

    async def aclose(self) -> None:
        """Stop the run and free its slot; idempotent."""
        await self._end(None, early=True)

    async def __aenter__(self) -> AdmittedStream:
        return await self.admit()

    async def __aexit__(self, *exc_info: object) -> None:
        await self._end(None, early=True)  # the block's own error says nothing of serving
