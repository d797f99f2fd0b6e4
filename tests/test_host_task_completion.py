"""Host backend: each task's await resolves right after its own work (issue 17, bug 6).

Tasks run as stream items there; the event marking the end of a task's work used to be
queued behind every task already launched on its context, so an await waited for its whole
batch (16 tasks for a Guaranteed context, pairs for BestEffort). No wall-clock figures:
each task's function waits for the previous task's await to have returned, which can only
happen if that await resolves before the next task's work is done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import anyio
import pytest

from pygpukit import MB, QoSPolicy
from pygpukit.runtime import Event, Runtime

N = 20  # more than a context's in-flight cap (16)
PATIENCE_S = 5.0  # how long a task waits for the previous await (only a failure waits)


@pytest.fixture
def one_unit(monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    monkeypatch.setenv("PYGPUKIT_HOST_WORKERS", "1")
    with Runtime(backend="host") as rt:
        yield rt


def test_work_an_item_enqueues_on_its_stream_runs_right_behind_it(one_unit: Runtime) -> None:
    stream = one_unit.create_stream()
    gate = threading.Event()
    order: list[str] = []

    def first() -> None:
        gate.wait(5)
        order.append("first")
        stream.launch_host_func(lambda: order.append("nested-1"))
        stream.launch_host_func(lambda: order.append("nested-2"))

    stream.launch_host_func(first)
    stream.launch_host_func(lambda: order.append("queued-behind"))  # before first() runs
    gate.set()
    stream.synchronize()
    assert order == ["first", "nested-1", "nested-2", "queued-behind"]


def test_an_event_recorded_by_an_item_completes_before_the_items_behind_it(
    one_unit: Runtime,
) -> None:
    stream = one_unit.create_stream()
    gate = threading.Event()
    recorded: list[Event] = []
    seen_done: list[bool] = []

    def first() -> None:
        gate.wait(5)
        recorded.append(stream.record())

    stream.launch_host_func(first)
    stream.launch_host_func(lambda: seen_done.append(recorded[0].done))
    gate.set()
    stream.synchronize()
    assert seen_done == [True]


@pytest.mark.anyio
@pytest.mark.parametrize("qos", [QoSPolicy.GUARANTEED, QoSPolicy.BURSTABLE, QoSPolicy.BEST_EFFORT])
async def test_each_await_resolves_before_the_next_task_finishes(
    host_rt: Runtime, qos: QoSPolicy
) -> None:
    ctx = host_rt.create_context("m", max_vram=16 * MB, qos=qos)
    returned = [threading.Event() for _ in range(N)]
    waited: list[bool] = []  # per task after the first: did the previous await return?
    submitted: list[int] = []
    ran: list[int] = []
    resolved: list[int] = []
    broken = threading.Event()  # one stalled wait is enough: do not stall every task

    def work(i: int) -> int:
        ran.append(i)
        if i and not broken.is_set():
            ok = returned[i - 1].wait(PATIENCE_S)
            waited.append(ok)
            if not ok:
                broken.set()
        return i

    async def one() -> None:
        i = len(submitted)  # in submission order, whatever order the tasks start in
        submitted.append(i)
        assert await ctx.submit(work, i) == i
        resolved.append(i)
        returned[i].set()

    with anyio.fail_after(N * PATIENCE_S + 30):
        async with anyio.create_task_group() as tg:
            for _ in range(N):
                tg.start_soon(one)
    assert ran == list(range(N))
    assert waited == [True] * (N - 1), "an await waited for the tasks launched after it"
    assert resolved == list(range(N))


@pytest.mark.anyio
async def test_tasks_launched_before_destroy_may_still_use_their_stream(host_rt: Runtime) -> None:
    # Launched tasks run as stream items after the work ahead of them: destroying the
    # context meanwhile must not close the stream under them (it finishes their work).
    ctx = host_rt.create_context("m", max_vram=MB)
    started = threading.Event()
    results: list[int] = []

    def work(i: int) -> int:
        if i == 0:
            started.set()
            time.sleep(0.05)  # still running when the context is destroyed
        ctx.stream.launch_host_func(lambda: None)
        return i

    async def one(i: int) -> None:
        results.append(await ctx.submit(work, i))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)
            await anyio.to_thread.run_sync(started.wait, 5)
            await anyio.to_thread.run_sync(host_rt.destroy_context, ctx)
    assert sorted(results) == [0, 1, 2]
