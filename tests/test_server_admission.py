"""Admission per pipeline (``pygpukit.integrations.fastapi.Admission``): a bounded, adaptive
number of requests run at once; the excess waits, or is refused as soon as it is known that
it cannot finish before its deadline.

The last test drives it against a processor-sharing device (every request slows down every
other), the shape of overload the example server showed: without admission every request of
a burst misses its deadline.
"""

from __future__ import annotations

import gc
import time
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from pydantic import BaseModel

from pygpukit import MB, DeadlineExceeded, InvalidArgument, InvalidArgumentType, QueueFull
from pygpukit.integrations.fastapi import (
    Admission,
    AdmissionConfig,
    AdmittedPipeline,
    Overloaded,
)
from pygpukit.pipeline import Pipeline, stage
from pygpukit.runtime import Runtime

pytestmark = pytest.mark.anyio


async def _hold(admission: Admission, release: anyio.Event, deadline: float | None = None) -> None:
    async with admission.slot(deadline):
        await release.wait()


async def _take(admission: Admission, got: list[str], name: str) -> None:
    async with admission.slot():
        got.append(name)


async def _serve(admission: Admission, seconds: float) -> None:
    async with admission.slot(time.monotonic() + 30):
        await anyio.sleep(seconds)


async def _settle() -> None:
    await anyio.wait_all_tasks_blocked()


def test_config_is_checked() -> None:
    with pytest.raises(InvalidArgument, match=r"^max_in_flight must be at least 1, got 0$"):
        AdmissionConfig(max_in_flight=0)
    with pytest.raises(InvalidArgumentType, match=r"^max_waiting must be an int, not 1.5$"):
        AdmissionConfig(max_waiting=1.5)  # type: ignore[arg-type]
    with pytest.raises(
        InvalidArgument,
        match=r"^initial_in_flight \(4\) must not exceed max_in_flight \(2\)$",
    ):
        AdmissionConfig(max_in_flight=2, initial_in_flight=4)
    with pytest.raises(InvalidArgument, match=r"^headroom must be in \(0, 1\]"):
        AdmissionConfig(headroom=0.0)


def test_overloaded_is_a_queue_full_with_its_facts_in_the_message() -> None:
    err = Overloaded(
        "describe", running=2, waiting=5, expected_s=1.25, left_s=0.5, retry_after_s=0.75
    )
    assert isinstance(err, QueueFull)
    assert str(err) == (
        "pipeline 'describe' is overloaded (2 running, 5 waiting) and this request would "
        "take 1.25 s, with 0.50 s left; retry after 0.8 s"
    )
    full = Overloaded("describe", 2, 64, None, None, 3.0)
    assert str(full) == (
        "pipeline 'describe' is overloaded (2 running, 64 waiting) and no more may wait; "
        "retry after 3.0 s"
    )
    import pickle

    again = pickle.loads(pickle.dumps(err))
    assert type(again) is Overloaded and str(again) == str(err)


async def test_the_limit_bounds_how_many_run_and_the_rest_wait_in_order() -> None:
    admission = Admission("p", AdmissionConfig(max_in_flight=2, initial_in_flight=2))
    release = anyio.Event()
    order: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, admission, release)
        tg.start_soon(_hold, admission, release)
        await _settle()
        for name in "abc":
            tg.start_soon(_take, admission, order, name)
            await _settle()
        s = admission.statistics()
        assert (s.limit, s.running, s.waiting, s.admitted) == (2, 2, 3, 2)
        release.set()
    assert sorted(order[:2]) == ["a", "b"] and order[2] == "c"  # in line; a, b got in at once
    s = admission.statistics()
    assert (s.running, s.waiting, s.admitted, s.refused) == (0, 0, 5, 0)


async def test_beyond_max_waiting_a_request_is_refused_at_once() -> None:
    one = AdmissionConfig(max_in_flight=1, initial_in_flight=1, max_waiting=1)
    admission = Admission("p", one)
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, admission, release)
        await _settle()
        tg.start_soon(_hold, admission, release)  # waits
        await _settle()
        with pytest.raises(Overloaded, match=r"\(1 running, 1 waiting\) and no more may wait"):
            await _hold(admission, release)
        release.set()
    assert admission.statistics().refused == 1


async def _refused_behind_one(admission: Admission, budget_s: float) -> tuple[Overloaded, float]:
    """A request with ``budget_s`` to finish, while one holds the only slot: its refusal,
    and how long it took to come."""
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, admission, release)
        await _settle()
        t0 = time.monotonic()
        with pytest.raises(Overloaded) as refused:
            await _hold(admission, release, deadline=t0 + budget_s)
        waited = time.monotonic() - t0
        release.set()
    return refused.value, waited


async def test_a_request_that_cannot_finish_in_time_is_refused_when_it_arrives() -> None:
    admission = Admission("p", AdmissionConfig(max_in_flight=1, initial_in_flight=1))
    async with anyio.create_task_group() as tg:  # a line: slots free every ~0.05 s
        for _ in range(5):
            tg.start_soon(_serve, admission, 0.05)
    s = admission.statistics()
    # uvloop rounds timers to whole milliseconds, so a 0.05 s sleep may end ~1 ms early
    assert s.service_s is not None and s.service_s >= 0.045
    # behind the one running: a slot in ~0.05 s, then ~0.05 s of serving
    err, waited = await _refused_behind_one(admission, 0.08)
    assert waited < 0.05, "refused only after waiting"
    assert (err.running, err.waiting) == (1, 0)
    assert err.expected_s is not None and 0.08 < err.expected_s < 0.5
    assert err.left_s is not None and 0 < err.left_s <= 0.08
    # one with time enough waits for its turn and gets it
    release = anyio.Event()
    got: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, admission, release)
        await _settle()
        tg.start_soon(_take, admission, got, "patient")
        await _settle()
        assert admission.statistics().waiting == 1
        release.set()
    assert got == ["patient"]


async def test_before_the_pace_is_known_a_request_waits_until_its_last_chance() -> None:
    admission = Admission("p", AdmissionConfig(max_in_flight=1, initial_in_flight=1))
    await _serve(admission, 0.05)  # serving measured; the pace (nobody waited) is not
    err, waited = await _refused_behind_one(admission, 0.3)
    # it gave up when starting could no longer finish: ~0.25 s, its deadline less 0.05
    assert 0.2 <= waited < 0.3, waited
    assert err.left_s is not None and err.left_s < 0.1


async def test_a_free_slot_admits_without_judging() -> None:
    """A wrong estimate must not shut the pipeline out: each admitted request measures it."""
    admission = Admission("p", AdmissionConfig(max_in_flight=1, initial_in_flight=1))
    await _serve(admission, 0.2)
    async with admission.slot(time.monotonic() + 0.01):  # far less than serving took
        pass
    assert admission.statistics().admitted == 2


async def _late(admission: Admission, release: anyio.Event | None = None) -> None:
    async def request() -> None:
        async with admission.slot(time.monotonic() + 30):
            if release is not None:
                await release.wait()
            raise DeadlineExceeded("pipeline 'p'", late_s=0.1, cancelled=["s"])

    with pytest.raises(DeadlineExceeded):
        await request()


async def test_late_requests_halve_the_limit_once_per_round() -> None:
    admission = Admission("p", AdmissionConfig(max_in_flight=8, initial_in_flight=8))
    release = anyio.Event()
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(_late, admission, release)
        await _settle()
        release.set()
    s = admission.statistics()
    assert (s.limit, s.late) == (4, 4)  # four late of one round: one cut, not four
    await _late(admission)  # admitted after the cut: cuts again
    assert admission.statistics().limit == 2


async def test_requests_finishing_in_time_while_others_wait_raise_the_limit() -> None:
    admission = Admission("p", AdmissionConfig(max_in_flight=4, initial_in_flight=1))
    async with anyio.create_task_group() as tg:  # 1 -> 2 -> 3 -> 4: 1 + 2 + 3 in time
        for _ in range(12):
            tg.start_soon(_serve, admission, 0.01)
    s = admission.statistics()
    assert s.limit == 4 and s.admitted == 12 and s.refused == 0


@pytest.mark.parametrize("granted", [False, True], ids=["while-waiting", "just-granted"])
async def test_a_cancelled_waiter_gives_its_place_to_the_next(granted: bool) -> None:
    admission = Admission("p", AdmissionConfig(max_in_flight=1, initial_in_flight=1))
    release = anyio.Event()
    got: list[str] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_hold, admission, release)
        await _settle()
        async with anyio.create_task_group() as doomed:
            doomed.start_soon(_take, admission, got, "doomed")
            await _settle()
            tg.start_soon(_take, admission, got, "next")
            await _settle()
            assert admission.statistics().waiting == 2
            if granted:  # in one step: the slot is handed to "doomed", then it is cancelled
                release.set()
            doomed.cancel_scope.cancel()
        assert admission.statistics().waiting == (0 if granted else 1)
        release.set()
    assert got == ["next"]
    s = admission.statistics()
    assert (s.running, s.waiting) == (0, 0)


class _Text(BaseModel):
    text: str


@stage("adm_echo")
async def _echo(inp: _Text) -> _Text:
    await anyio.sleep(0.01)
    return _Text(text=inp.text)


@stage("adm_words")
async def _words(inp: _Text) -> AsyncIterator[_Text]:
    for word in inp.text.split():
        await anyio.sleep(0.005)
        yield _Text(text=word)


@pytest.fixture
def host() -> Iterator[Runtime]:
    with Runtime(backend="host", vram_limit=64 * MB) as rt:
        yield rt


async def test_an_admitted_pipeline_runs_and_streams_within_slots(host: Runtime) -> None:
    admission = Admission("echo", AdmissionConfig(max_in_flight=1, initial_in_flight=1))
    echo = AdmittedPipeline(Pipeline.chain("echo", _echo, runtime=host).build(), admission)
    words = AdmittedPipeline(Pipeline.chain("words", _words, runtime=host).build(), admission)
    result = await echo.run({"text": "hi"}, deadline=time.monotonic() + 30)
    assert result.output == _Text(text="hi")
    assert echo.stage_ids == ("adm_echo",)  # everything else is the pipeline's
    stream = words.stream({"text": "a b c"})
    assert [w.text async for w in stream] == ["a", "b", "c"]
    assert stream.timings is not None and "adm_words" in stream.timings
    async with words.stream({"text": "a b c d e f"}) as items:
        async for _ in items:
            assert admission.statistics().running == 1  # held while it streams
            break
    s = admission.statistics()
    assert (s.running, s.admitted) == (0, 3)


async def test_an_abandoned_stream_gives_its_slot_back(host: Runtime) -> None:
    admission = Admission("words", AdmissionConfig(max_in_flight=1, initial_in_flight=1))
    words = AdmittedPipeline(Pipeline.chain("words", _words, runtime=host).build(), admission)
    stream = words.stream({"text": "a b c"})
    await stream.__anext__()
    assert admission.statistics().running == 1
    gen = stream._stream
    del stream
    if gen is not None:
        await gen.aclose()  # what the event loop's async-generator hooks would do
    del gen
    gc.collect()
    with anyio.fail_after(5):
        async with admission.slot():  # the slot came back
            pass
    assert admission.statistics().running == 0


class _SharedDevice:
    """Serves requests side by side, each at 1/n of the speed when n are served at once
    (processor sharing): past one at a time, more at once only take longer each."""

    def __init__(self) -> None:
        self.active = 0

    async def serve(self, work_s: float, deadline: float) -> None:
        self.active += 1
        try:
            left = work_s
            while left > 0:
                t0 = time.monotonic()
                await anyio.sleep(0.002)
                left -= (time.monotonic() - t0) / self.active
                if time.monotonic() > deadline:
                    raise DeadlineExceeded("request", late_s=0.0, cancelled=["serve"])
        finally:
            self.active -= 1


async def _burst(admission: Admission | None, n: int, work_s: float, budget_s: float) -> list[str]:
    device = _SharedDevice()
    codes: list[str] = []

    async def one() -> None:
        deadline = time.monotonic() + budget_s
        try:
            if admission is None:
                await device.serve(work_s, deadline)
            else:
                async with admission.slot(deadline):
                    await device.serve(work_s, deadline)
            codes.append("ok")
        except Overloaded:
            codes.append("refused")
        except DeadlineExceeded:
            codes.append("late")

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return codes


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_burst_on_a_shared_device_is_refused_early_so_the_admitted_finish() -> None:
    # 30 requests of 20 ms of device each, 0.3 s to finish: at most ~15 can
    unguarded = await _burst(None, 30, 0.02, 0.3)
    assert unguarded.count("late") == 30  # everyone slowed down together: no one made it
    admission = Admission("p")
    for _ in range(3):
        codes = await _burst(admission, 30, 0.02, 0.3)
        assert codes.count("ok") >= 5, codes
        assert codes.count("refused") >= 5, codes
        assert codes.count("late") <= 2, codes
