"""The interfaces through which a runtime is given its policies: a scheduling policy
(``Runtime(policy=)``), partitions (``use_partitions``), task listeners, and the step
binding the pipeline layer uses."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from pygpukit import MB, InvalidArgument, InvalidArgumentType, QoSPolicy
from pygpukit.runtime import (
    Dispatcher,
    Runtime,
    Task,
    TaskState,
    bind_each_step,
    current_context,
    steps_are_bound,
)

pytestmark = pytest.mark.anyio


class Fifo:
    """A scheduling policy of the test's own: one task at a time, in arrival order, whatever
    the tier — the opposite of what the default dispatcher does."""

    def __init__(self) -> None:
        self.clock: Callable[[], float] = lambda: 0.0
        self.waiting: list[Task] = []
        self.running: Task | None = None
        self.bound = 0
        self.finished_tasks: list[Task] = []
        self.lock = threading.Lock()

    def bind(self, launch: Callable[[Task], None], over_share: object) -> None:
        self.bound += 1
        self.launch = launch

    def enqueue(self, task: Task) -> None:
        with self.lock:
            self.waiting.append(task)
        self._next()

    def _next(self) -> None:
        with self.lock:
            if self.running is not None or not self.waiting:
                return
            task = self.running = self.waiting.pop(0)
            task.state = TaskState.RUNNING
        self.launch(task)

    def cancel(self, task: Task) -> bool:
        with self.lock:
            if task in self.waiting:
                self.waiting.remove(task)
                task.state = TaskState.CANCELLED
                return True
        return False

    def expire(self, task: Task) -> bool:
        return self.cancel(task)

    def finished(self, task: Task, value: Any, exc: BaseException | None) -> None:
        with self.lock:
            self.running = None
            task.state = TaskState.FAILED if exc else TaskState.DONE
            self.finished_tasks.append(task)
        task.deliver(value, exc)
        self._next()

    def queued(self) -> list[Task]:
        with self.lock:
            return list(self.waiting)

    def counts(self, context: Any) -> tuple[int, int]:
        with self.lock:
            queued = sum(t.context is context for t in self.waiting)
            return queued, int(self.running is not None and self.running.context is context)

    def forget(self, context: Any) -> None:
        pass


async def test_a_runtime_runs_tasks_in_the_order_its_policy_launches_them() -> None:
    policy = Fifo()
    with Runtime(backend="host", vram_limit=1 << 30, policy=policy) as rt:
        assert rt.policy is policy and policy.bound == 1
        g = rt.create_context("g", max_vram=MB, qos=QoSPolicy.GUARANTEED)
        be = rt.create_context("be", max_vram=MB, qos=QoSPolicy.BEST_EFFORT)
        gate = threading.Event()
        ran: list[str] = []

        def step(name: str) -> str:
            if name == "first":
                gate.wait(10)
            assert current_context() is (g if name.startswith("g") else be)
            ran.append(name)
            return name.upper()

        results: dict[str, str] = {}

        async def submit(ctx: Any, name: str) -> None:
            results[name] = await ctx.submit(step, name)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(submit, be, "first")
                await anyio.wait_all_tasks_blocked()
                for name in ("be-1", "g-1", "be-2", "g-2"):  # arrival order
                    tg.start_soon(submit, be if name.startswith("be") else g, name)
                    await anyio.wait_all_tasks_blocked()
                assert be.usage().queued == 2 and g.usage().queued == 2
                gate.set()
        # The default dispatcher would run g-1, g-2 before be-1: the policy decided instead.
        assert ran == ["first", "be-1", "g-1", "be-2", "g-2"]
        assert results == {n: n.upper() for n in ran}
        assert [t.fn for t in policy.finished_tasks] == [step] * 5


def _host_units() -> int:
    return sum(t.name.startswith("pygpukit-host-unit") for t in threading.enumerate())


def test_a_dispatcher_serves_one_runtime_and_a_refused_runtime_leaves_nothing() -> None:
    policy = Dispatcher()
    with Runtime(backend="host", vram_limit=1 << 30, policy=policy):
        units = _host_units()
        with pytest.raises(InvalidArgument, match="give each Runtime a Dispatcher of its own"):
            Runtime(backend="host", vram_limit=1 << 30, policy=policy)
        deadline = time.monotonic() + 5  # the refused runtime's executor threads exit
        while _host_units() > units and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _host_units() == units


async def test_destroyed_contexts_are_not_kept_by_the_policy(host_rt: Runtime) -> None:
    policy = host_rt.policy
    assert isinstance(policy, Dispatcher)
    refs = []
    for i in range(50):
        ctx = host_rt.create_context(f"tenant-{i}", max_vram=MB)
        assert await ctx.submit(lambda i=i: i) == i
        host_rt.destroy_context(ctx)
        refs.append(weakref.ref(ctx))
        del ctx
    assert len(policy.queued_ctx) == 0 and len(policy.in_flight_ctx) == 0
    with anyio.fail_after(5):  # a stopped launcher thread lets go of its context as it exits
        while any(t.name.startswith("pygpukit-launcher-") for t in threading.enumerate()):
            await anyio.sleep(0.01)
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


def test_use_partitions_takes_a_partition_policy(host_rt: Runtime) -> None:
    with pytest.raises(TypeError, match=r"^use_partitions\(\) takes a PartitionManager"):
        host_rt.use_partitions(object())  # type: ignore[arg-type]
    assert host_rt.partitions is None


async def test_task_listeners_see_every_finished_task(host_rt: Runtime) -> None:
    seen: list[tuple[str, TaskState]] = []
    host_rt.on_task_done(lambda task: seen.append((task.context.name, task.state)))
    ctx = host_rt.create_context("m", max_vram=MB)
    await ctx.submit(lambda: None)
    with pytest.raises(ZeroDivisionError):
        await ctx.submit(lambda: 1 / 0)
    assert seen == [("m", TaskState.DONE), ("m", TaskState.FAILED)]
    with pytest.raises(InvalidArgumentType):
        host_rt.on_task_done("not callable")  # type: ignore[arg-type]


async def test_bind_each_step_keeps_a_driven_coroutine_in_its_session(host_rt: Runtime) -> None:
    """What the pipeline layer uses to drive stages in a copy of the caller's context."""
    from pygpukit import context_session

    ctx = host_rt.create_context("m", max_vram=MB)
    seen: list[object] = []

    async def stage() -> None:
        async with context_session(ctx):
            seen.append(current_context())
            await anyio.lowlevel.checkpoint()
            seen.append(current_context())
        seen.append(current_context())

    assert steps_are_bound()  # host only: no stream binding at steps is needed
    await bind_each_step(stage())
    assert seen == [ctx, ctx, None]


def test_each_function_is_known_by_its_own_code() -> None:
    """The launcher learns how long each function takes (inline execution, shared
    completion signals) under its code object: shared by closures made per call, distinct
    between functions."""
    import functools

    from pygpukit.runtime._launcher import _cost_key

    def make() -> Callable[[], None]:
        return lambda: None

    def other() -> None:
        pass

    class Model:
        def step(self) -> None:
            pass

        def __call__(self) -> None:
            pass

    first, second = make(), make()
    assert _cost_key(first) is _cost_key(second) is first.__code__
    assert _cost_key(other) is other.__code__ is not first.__code__
    assert _cost_key(functools.partial(other)) is other.__code__
    assert _cost_key(Model().step) is Model.step.__code__
    assert _cost_key(Model()) is Model.__call__.__code__
    assert _cost_key(len) is None
