"""Host backend: each task's await resolves right after its own work (issue 17, bug 6).

Tasks run as stream items there; the event marking the end of a task's work used to be
queued behind every task already launched on its context, so an await waited for its whole
batch (16 tasks for a Guaranteed context, pairs for BestEffort). No wall-clock figures:
each task's function waits for the previous task's await to have returned, which can only
happen if that await resolves before the next task's work is done.
"""

from __future__ import annotations

import threading

import anyio
import pytest

from pygpukit import MB, QoSPolicy
from pygpukit.runtime import Runtime

N = 20  # more than a context's in-flight cap (16)
PATIENCE_S = 5.0  # how long a task waits for the previous await (only a failure waits)


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
