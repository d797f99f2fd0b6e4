"""Bad input at the boundaries: array sizes, deadlines, async functions given to submit.

Each is refused with the error the rule calls for (a wrong value is a ``ValueError``, a
wrong type a ``TypeError``), and leaves nothing behind: no charge, no corrupted arena, no
coroutine that warns it was never awaited.
"""

from __future__ import annotations

import functools
import gc
import inspect
import math
import time
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

from pygpukit import (
    MB,
    InvalidArgument,
    InvalidArgumentType,
    QoSPolicy,
    context_session,
)
from pygpukit.pipeline import Pipeline, stage
from pygpukit.runtime import ExecutionContext, Runtime
from pygpukit.runtime._backends._arena import Arena

NEGATIVE = r"^negative dimensions are not allowed, got shape \(.*\); pass sizes >= 0$"


def _charges(ctx: ExecutionContext) -> tuple[int, int]:
    usage = ctx.usage()
    return usage.used, usage.held


# -- array sizes ---------------------------------------------------------------------------
@pytest.mark.parametrize("qos", [QoSPolicy.GUARANTEED, QoSPolicy.BURSTABLE])
def test_a_negative_size_is_refused_and_later_allocations_still_work(
    host_rt: Runtime, qos: QoSPolicy
) -> None:
    ctx = host_rt.create_context("m", max_vram=16 * MB, qos=qos)
    xp = host_rt.xp
    with context_session(ctx):
        keep = xp.ones(1000, dtype="uint8")
        before = _charges(ctx)
        with pytest.raises(InvalidArgument, match=NEGATIVE) as info:
            xp.empty(-1_000_000)
        assert isinstance(info.value, ValueError)  # as NumPy's and CuPy's own
        assert _charges(ctx) == before  # nothing charged, nothing credited
        # the reservation's arena is intact: it still serves every byte of its budget
        rest = xp.empty(16 * MB - 1024, dtype="uint8")
        assert _charges(ctx) == (16 * MB, 16 * MB)
        assert int(keep.sum()) == 1000
        del rest, keep
    assert _charges(ctx) == (0, 0)


@pytest.mark.parametrize(
    "make",
    [
        lambda xp: xp.zeros(-5),
        lambda xp: xp.empty((3, -1)),
        lambda xp: xp.ones((-2,), dtype="float32"),
        lambda xp: xp.full(-1, 7),
        lambda xp: xp.zeros((0, -4)),
    ],
    ids=["zeros", "empty-2d", "ones", "full", "zeros-0xneg"],
)
def test_every_constructor_refuses_negative_dimensions_like_numpy(
    host_rt: Runtime, make: Callable[[Any], object]
) -> None:
    with pytest.raises(ValueError, match="negative dimensions"):  # NumPy's, ours must match
        make(np)
    with pytest.raises(InvalidArgument, match=NEGATIVE):
        make(host_rt.xp)
    assert host_rt.ledger.unscoped.held == 0


@pytest.mark.parametrize("shape", [2.5, True, (2, True), "3", None])
def test_a_shape_that_is_not_integers_is_a_type_error_like_numpy(
    host_rt: Runtime, shape: object
) -> None:
    with pytest.raises(TypeError):
        np.empty(shape)  # type: ignore[call-overload]
    with pytest.raises(
        InvalidArgumentType,
        match=r"^shape must be an integer or a sequence of integers \(as NumPy takes it\), not ",
    ):
        host_rt.xp.empty(shape)
    assert host_rt.ledger.unscoped.held == 0


def test_integer_types_numpy_takes_are_taken(host_rt: Runtime) -> None:
    ctx = host_rt.create_context("m", max_vram=16 * MB)
    with context_session(ctx):
        a = host_rt.xp.zeros(np.int64(3))
        b = host_rt.xp.zeros((np.int32(2), 0))
        c = host_rt.xp.empty([4, 2], dtype="uint8")
    assert (a.shape, b.shape, c.shape) == ((3,), (2, 0), (4, 2))
    assert ctx.usage().used == 2 * 512  # b has no bytes and takes none
    del a, b, c


def test_the_pool_refuses_a_negative_byte_count_before_charging(host_rt: Runtime) -> None:
    g = host_rt.create_context("g", max_vram=4 * MB, qos=QoSPolicy.GUARANTEED)
    for pool in (g._pool, host_rt._unscoped):
        with pytest.raises(InvalidArgument, match=r"^cannot allocate a negative number"):
            pool.malloc(-4096)
    assert _charges(g) == (0, 0)
    with pytest.raises(InvalidArgument, match=r"^cannot charge a negative number of bytes"):
        host_rt.ledger.grow(g._account, -1)
    assert _charges(g) == (0, 0)
    with context_session(g):
        whole = host_rt.xp.empty(4 * MB, dtype="uint8")  # the arena is still whole
    del whole


@pytest.mark.parametrize("n", [0, -1, -4096])
def test_an_arena_range_must_be_at_least_one_byte(n: int) -> None:
    arena = Arena(1024, "g")
    with pytest.raises(InvalidArgument, match=r"^an arena range must be at least one byte"):
        arena.take(n)
    assert (arena.used, arena.largest_free, arena.take(1024)) == (0, 1024, 0)


def test_a_range_that_cannot_be_wrapped_goes_back_to_the_arena(
    host_rt: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = host_rt.create_context("g", max_vram=4 * MB, qos=QoSPolicy.GUARANTEED)
    arena = g._pool._arena  # type: ignore[attr-defined]
    assert arena is not None

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no buffer today")

    monkeypatch.setattr(np, "frombuffer", broken)
    with context_session(g), pytest.raises(RuntimeError, match="no buffer today"):
        host_rt.xp.empty(MB, dtype="uint8")
    monkeypatch.undo()
    assert (arena.used, arena.largest_free) == (0, 4 * MB)
    assert _charges(g) == (0, 0)


# -- deadlines -----------------------------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize("deadline", [math.nan, float("nan"), np.float64("nan")])
async def test_a_nan_deadline_is_refused(host_rt: Runtime, deadline: object) -> None:
    ctx = host_rt.create_context("m", max_vram=MB)
    ran: list[int] = []
    with pytest.raises(
        InvalidArgument,
        match=r"^deadline must be a time on the runtime's clock \(time\.monotonic\(\) by "
        r"default\) or None, not NaN; e\.g\. deadline=time\.monotonic\(\) \+ 0\.5$",
    ):
        await ctx.submit(ran.append, 1, deadline=deadline)
    assert ran == []
    assert ctx.usage().queued == 0


@pytest.mark.anyio
@pytest.mark.parametrize("deadline", [True, False, np.bool_(True), "soon", 1j])
async def test_a_deadline_that_is_not_a_number_is_a_type_error(
    host_rt: Runtime, deadline: object
) -> None:
    ctx = host_rt.create_context("m", max_vram=MB)
    with pytest.raises(InvalidArgumentType, match=r"^deadline must be a time on the runtime"):
        await ctx.submit(lambda: None, deadline=deadline)
    assert ctx.usage().queued == 0


@pytest.mark.anyio
async def test_deadlines_of_any_real_type_are_taken(host_rt: Runtime) -> None:
    ctx = host_rt.create_context("m", max_vram=MB)
    far = time.monotonic() + 60
    for deadline in (far, int(far), np.float64(far), np.int64(int(far)), math.inf):
        assert await ctx.submit(lambda: 7, deadline=deadline) == 7


class Ping(BaseModel):
    n: int


@stage("bi_echo")
async def echo(inp: Ping) -> Ping:
    return inp


@pytest.mark.anyio
async def test_a_pipeline_run_checks_its_deadline_the_same_way(host_rt: Runtime) -> None:
    p = Pipeline("echo", runtime=host_rt).add(echo, inputs={"n": "$input.n"})
    with pytest.raises(InvalidArgument, match=r"^deadline must be .* not NaN"):
        await p.run({"n": 1}, deadline=math.nan)
    with pytest.raises(InvalidArgumentType, match=r"^deadline must be .* not True$"):
        await p.run({"n": 1}, deadline=True)
    with pytest.raises(InvalidArgument, match=r"^deadline must be .* not NaN"):
        p.stream({"n": 1}, deadline=math.nan)
    assert (await p.run({"n": 2}, deadline=np.float64(time.monotonic() + 60))).output == Ping(n=2)


# -- async functions given to submit -------------------------------------------------------
class AsyncCallable:
    async def __call__(self) -> int:
        return 1


class AsyncGenCallable:
    async def __call__(self) -> Any:
        yield 1


async def _coro_fn() -> int:
    return 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    "fn",
    [
        _coro_fn,
        AsyncCallable(),
        AsyncGenCallable(),
        functools.partial(_coro_fn),
        functools.partial(AsyncCallable()),
        AsyncCallable().__call__,
    ],
    ids=["coroutine-function", "async-call", "async-gen-call", "partial", "partial-obj", "bound"],
)
async def test_submit_refuses_async_callables_before_queueing(
    host_rt: Runtime, fn: Callable[[], object]
) -> None:
    ctx = host_rt.create_context("m", max_vram=MB)
    with pytest.raises(
        InvalidArgumentType,
        match=r"^submit\(\) runs a plain function on the context's launcher thread, and .+ is "
        r"async; await it inside 'async with context_session\(ctx\)' instead$",
    ):
        await ctx.submit(fn)
    assert (ctx.usage().tasks, ctx.usage().queued) == (0, 0)


@pytest.mark.anyio
async def test_a_function_returning_a_coroutine_fails_its_task_and_closes_it(
    host_rt: Runtime,
) -> None:
    ctx = host_rt.create_context("m", max_vram=MB)
    made: list[Coroutine[Any, Any, int]] = []

    def sneaky() -> Coroutine[Any, Any, int]:
        made.append(_coro_fn())
        return made[-1]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fn in (sneaky, lambda: sneaky()):
            with pytest.raises(
                InvalidArgumentType,
                match=r"^.+, submitted to context 'm', returned the coroutine _coro_fn\(\) "
                r"instead of a result: submit\(\) runs plain functions on the context's "
                r"launcher thread, where nothing awaits; await async code inside "
                r"'async with context_session\(ctx\)' instead$",
            ):
                await ctx.submit(fn)
        assert [inspect.getcoroutinestate(c) for c in made] == ["CORO_CLOSED"] * 2
        made.clear()
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]
    usage = ctx.usage()
    assert (usage.tasks, usage.failed, usage.in_flight) == (2, 2, 0)
    assert await ctx.submit(lambda: 3) == 3  # the context is fine afterwards


@pytest.mark.anyio
async def test_other_awaitables_are_results(host_rt: Runtime) -> None:
    ctx = host_rt.create_context("m", max_vram=MB)
    event = await ctx.submit(ctx.record_event)  # work already enqueued: a result
    await event
    assert event.query()
