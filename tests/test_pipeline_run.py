"""Running pipelines: concurrency, streaming, cancellation, deadlines, request info, timings.

Stages do real array work through their context's ``xp`` so that each context's charges
are visible; every test runs over asyncio, uvloop and trio.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from contextvars import ContextVar
from dataclasses import replace

import anyio
import numpy as np
import pytest
from pydantic import BaseModel

from pygpukit import MB, DeadlineExceeded, QoSPolicy, QueueFull, current_context
from pygpukit.pipeline import Array, Pipeline, RequestInfo, current_request, stage
from pygpukit.pipeline import _run as pipeline_run
from pygpukit.runtime import ExecutionContext, Runtime, _session, hook_event_loop

pytestmark = pytest.mark.anyio

LOG: list[str] = []  # "enter <stage>" / "exit <stage>", in order
SEEN: list[RequestInfo | None] = []


class Job(BaseModel):
    n: int
    delay: float = 0.05


class Part(BaseModel):
    value: float


class Pair(BaseModel):
    a: float
    b: float


class Total(BaseModel):
    total: float


class Prompt(BaseModel):
    prompt: str


class Word(BaseModel):
    text: str


class Clip(BaseModel):
    samples: Array[np.float32, (None,)]


def _ctx() -> ExecutionContext:
    ctx = current_context()
    assert ctx is not None, "stage ran outside its context's session"
    return ctx


@contextlib.contextmanager
def _logged(name: str) -> Iterator[None]:
    LOG.append(f"enter {name}")
    SEEN.append(current_request())
    try:
        yield
    finally:
        LOG.append(f"exit {name}")


@stage("tr_left", context="left")
async def left(inp: Job) -> Part:
    with _logged("tr_left"):
        x = _ctx().runtime.xp.ones(inp.n, dtype="float32")  # charged to "left"
        await anyio.sleep(inp.delay)
        return Part(value=float(x.sum()))


@stage("tr_right", context="right")
async def right(inp: Job) -> Part:
    with _logged("tr_right"):
        x = _ctx().runtime.xp.full(inp.n, 2, dtype="float32")  # charged to "right"
        await anyio.sleep(inp.delay)
        return Part(value=float(x.sum()))


@stage("tr_join", context="left")
async def join(inp: Pair) -> Total:
    with _logged("tr_join"):
        return Total(total=inp.a + inp.b)


@stage("tr_boom", context="right")
async def boom(inp: Job) -> Part:
    with _logged("tr_boom"):
        await anyio.sleep(0.02)
        raise ValueError("boom")


@stage("tr_words", context="left")
async def words(inp: Prompt) -> AsyncIterator[Word]:
    with _logged("tr_words"):
        xp = _ctx().runtime.xp
        for w in inp.prompt.split():
            state = xp.zeros(1024, dtype="float32")  # per-token work in "left"
            await anyio.sleep(0.03)
            yield Word(text=w * int(state.size // 1024))


@stage("tr_speak", context="right")
async def speak(inp: Word) -> Clip:
    with _logged("tr_speak"):
        clip = _ctx().runtime.xp.zeros(100 * len(inp.text), dtype="float32")
        await anyio.sleep(0.01)
        return Clip(samples=clip)


class Scene(BaseModel):
    caption: str


class Line(BaseModel):
    text: str
    caption: str


@stage("tr_look", context="right")
async def look(inp: Prompt) -> Scene:
    with _logged("tr_look"):
        await anyio.sleep(0.01)
        return Scene(caption=inp.prompt.upper()[:3])


@stage("tr_narrate", context="right")
async def narrate(inp: Line) -> Word:
    with _logged("tr_narrate"):
        return Word(text=f"{inp.caption}:{inp.text}")


@stage("tr_wrong", context="left")
async def wrong(inp: Job) -> Part:
    return Total(total=1.0)  # type: ignore[return-value]


@pytest.fixture(autouse=True)
def _clear_log() -> Iterator[None]:
    LOG.clear()
    SEEN.clear()
    yield
    LOG.clear()
    SEEN.clear()


@pytest.fixture
def ctxs(host_rt: Runtime) -> dict[str, ExecutionContext]:
    return {
        "left": host_rt.create_context("left", max_vram=64 * MB),
        "right": host_rt.create_context("right", max_vram=64 * MB, qos=QoSPolicy.BEST_EFFORT),
    }


def _fan(rt: Runtime) -> Pipeline:
    return (
        Pipeline("fan", runtime=rt)
        .add(left, inputs={"n": "$input.n", "delay": "$input.delay"})
        .add(right, inputs={"n": "$input.n", "delay": "$input.delay"})
        .add(join, inputs={"a": "tr_left.value", "b": "tr_right.value"})
    )


def _used(ctxs: dict[str, ExecutionContext]) -> dict[str, int]:
    return {name: c.usage().used for name, c in ctxs.items()}


def _balanced() -> bool:
    return sum(e.startswith("enter") for e in LOG) == sum(e.startswith("exit") for e in LOG)


async def test_independent_branches_overlap_and_fan_in(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    result = await _fan(host_rt).run({"n": 1000, "delay": 0.1})
    assert result.output == Total(total=3000.0)
    t = result.timings
    lft, rgt, jn = t["tr_left"], t["tr_right"], t["tr_join"]
    assert lft.start is not None and rgt.start is not None and jn.start is not None
    assert lft.end is not None and rgt.end is not None
    assert lft.start < rgt.end and rgt.start < lft.end, f"branches did not overlap: {t}"
    assert result.elapsed_s < 0.19, "two 0.1 s branches ran one after the other"
    assert jn.start >= max(lft.end, rgt.end)
    assert ctxs["left"].usage().sessions >= 2 and ctxs["right"].usage().sessions >= 1


async def test_timings_are_present_and_ordered(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    result = await _fan(host_rt).run({"n": 10, "delay": 0.01})
    assert set(result.timings) == {"tr_left", "tr_right", "tr_join"}
    for sid, timing in result.timings.items():
        assert timing.start is not None and timing.end is not None, sid
        assert timing.first_item_at is not None, sid
        assert 0 <= timing.start <= timing.first_item_at <= timing.end <= result.elapsed_s, sid
        assert (timing.items, timing.calls) == (1, 1), sid
    assert result.first_output_s == result.timings["tr_join"].first_item_at


async def test_streaming_stage_feeds_downstream_before_it_finishes(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    p = Pipeline.chain("speak", words, speak, runtime=host_rt)
    result = await p.run({"prompt": "one two three four five"})
    up, down = result.timings["tr_words"], result.timings["tr_speak"]
    assert [c.samples.shape for c in result.output] == [(300,), (300,), (500,), (400,), (400,)]
    assert (up.items, up.calls, down.items, down.calls) == (5, 1, 5, 5)
    assert down.first_item_at is not None and up.end is not None
    assert down.first_item_at < up.end, f"downstream waited for the whole stream: {up} {down}"
    assert result.first_output_s == down.first_item_at
    # item 1 was processed while upstream produced item 2: the stages interleave
    assert LOG[:3] == ["enter tr_words", "enter tr_speak", "exit tr_speak"]


async def test_stream_yields_items_as_they_are_produced(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    p = Pipeline.chain("speak", words, speak, runtime=host_rt)
    t0 = time.perf_counter()
    arrivals: list[float] = []
    stream = p.stream({"prompt": "a bb ccc"})
    async for clip in stream:
        arrivals.append(time.perf_counter() - t0)
        assert isinstance(clip, Clip)
    assert len(arrivals) == 3
    assert stream.timings is not None
    assert arrivals[0] < stream.timings["tr_words"].end  # type: ignore[operator]


async def test_stopping_a_stream_early_cancels_the_stages(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    before = _used(ctxs)
    p = Pipeline.chain("speak", words, speak, runtime=host_rt)
    async with p.stream({"prompt": "a b c d e f g h i j"}) as items:
        async for clip in items:
            assert isinstance(clip, Clip)
            break
    del clip  # the item we kept is charged to its stage's context, as it should be
    assert _balanced(), LOG
    assert "exit tr_words" in LOG
    assert _used(ctxs) == before


async def test_cancelling_run_cancels_every_stage_and_frees_their_memory(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    before = _used(ctxs)
    tasks_before = _task_ids()
    p = _fan(host_rt)
    async with anyio.create_task_group() as tg:
        tg.start_soon(p.run, {"n": 1 << 16, "delay": 30.0})
        await anyio.wait_all_tasks_blocked()  # both branches are in their 30 s sleep
        assert sorted(LOG) == ["enter tr_left", "enter tr_right"]
        # the run's tasks are seen, on every backend: the checks below are not vacuous
        assert _pipeline_tasks() == [  # the supervisor and a task per chain of stages
            "pipeline fan",
            "pipeline fan:tr_join",
            "pipeline fan:tr_left",
            "pipeline fan:tr_right",
        ]
        tg.cancel_scope.cancel()
    assert sorted(LOG) == ["enter tr_left", "enter tr_right", "exit tr_left", "exit tr_right"]
    assert _used(ctxs) == before  # the arrays each stage held were released
    assert _pipeline_tasks() == []  # no stage task left behind
    assert _task_ids() == tasks_before  # nor any other task


def _task_ids() -> set[int]:
    """Every task running now (a trio run's tasks from its root down, system tasks too)."""
    return {task.id for task in anyio.get_running_tasks()}


def _pipeline_tasks() -> list[str]:
    """The names of the tasks a pipeline run made, running now."""
    names = (task.name or "" for task in anyio.get_running_tasks())
    return sorted(name for name in names if name.startswith("pipeline "))


async def test_cancelling_mid_stream_frees_items_in_flight(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    before = _used(ctxs)
    p = Pipeline.chain("speak", words, speak, runtime=host_rt)
    with anyio.move_on_after(0.1):
        await p.run({"prompt": " ".join(["w"] * 50)})
    assert _balanced(), LOG
    assert _used(ctxs) == before


async def test_a_failing_stage_cancels_the_others_and_raises_its_own_error(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    before = _used(ctxs)
    p = (
        Pipeline("p", runtime=host_rt)
        .add(left, inputs={"n": "$input.n", "delay": "$input.delay"})
        .add(boom, inputs={"n": "$input.n"})
        .add(join, inputs={"a": "tr_left.value", "b": "tr_boom.value"})
    )
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"^boom$"):
        await p.run({"n": 1000, "delay": 30.0})
    assert time.perf_counter() - t0 < 5
    assert _balanced() and "enter tr_join" not in LOG, LOG
    assert _used(ctxs) == before


class _Together:
    """Makes two stages fail in one step of the loop: ``second`` waits until ``first`` is
    about to raise, so it raises before the cancellation ``first`` starts can reach it."""

    ready: anyio.Event | None = None


@stage("tr_full_first", context="left")
async def full_first(inp: Job) -> Part:
    await anyio.sleep(0.01)
    assert _Together.ready is not None
    _Together.ready.set()  # wakes tr_full_second, then fails without a checkpoint
    raise QueueFull("left's queue is full")


@stage("tr_full_second", context="right")
async def full_second(inp: Job) -> Part:
    assert _Together.ready is not None
    await _Together.ready.wait()
    raise DeadlineExceeded("task 'step' of context 'right'", late_s=0.0)


def _failing_together(rt: Runtime) -> Pipeline:
    return (
        Pipeline("both", runtime=rt)
        .add(full_second, inputs={"n": "$input.n"})
        .add(full_first, inputs={"n": "$input.n"})
        .add(join, inputs={"a": "tr_full_first.value", "b": "tr_full_second.value"})
    )


@pytest.mark.parametrize("how", ["run", "stream"])
async def test_branches_failing_together_raise_the_first_error_not_a_group(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext], how: str
) -> None:
    _Together.ready = anyio.Event()
    p = _failing_together(host_rt)

    async def consume() -> None:
        if how == "run":
            await p.run({"n": 1})
        else:
            async with p.stream({"n": 1}) as items:
                async for _ in items:
                    pass

    with pytest.raises(QueueFull) as caught:
        await consume()
    assert str(caught.value) == "left's queue is full"
    # the other branch's failure is kept, as a note naming its stage
    assert caught.value.__notes__ == [
        "stage 'tr_full_second' of pipeline 'both' failed at the same time: "
        "DeadlineExceeded: task 'step' of context 'right' missed its deadline by 0.0 ms "
        "before it started (nothing ran); give it a later deadline, a higher priority or "
        "tier, or less work queued ahead of it"
    ]
    assert "enter tr_join" not in LOG


async def test_request_info_reaches_every_stage(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    deadline = time.monotonic() + 60
    await _fan(host_rt).run(
        {"n": 4, "delay": 0.0}, tier="guaranteed", priority=3, deadline=deadline
    )
    assert current_request() is None  # only stages see it
    by_stage = {info.stage_id: info for info in SEEN if info is not None}
    assert set(by_stage) == {"tr_left", "tr_right", "tr_join"}
    for sid, info in by_stage.items():
        assert info == RequestInfo(QoSPolicy.GUARANTEED, 3, deadline, "fan", sid)


@stage("tr_submit", context="right")
async def submit(inp: Job) -> Part:
    req = current_request()
    assert req is not None
    ctx = _ctx()
    xp = ctx.runtime.xp

    def work() -> float:
        return float(xp.ones(inp.n, dtype="float32").sum())

    # the request's priority and deadline go on to the QoS scheduler
    value = await ctx.submit(work, priority=req.priority, deadline=req.deadline)
    return Part(value=value)


async def test_stages_pass_request_priority_and_deadline_to_submit(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    p = Pipeline("p", runtime=host_rt).add(submit)
    result = await p.run({"n": 8}, priority=1, deadline=time.monotonic() + 60)
    assert result.output == Part(value=8.0)
    assert ctxs["right"].usage().tasks == 1


async def test_deadline_in_the_past_runs_nothing(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    with pytest.raises(
        DeadlineExceeded,
        match=r"^pipeline 'fan' missed its deadline by \d+\.\d ms before it started \(nothing "
        r"ran\); give it a later deadline, a higher priority or tier, or less work queued ahead "
        r"of it$",
    ):
        await _fan(host_rt).run({"n": 4}, deadline=time.monotonic() - 0.01)
    assert LOG == []


async def test_deadline_passing_mid_run_cancels_the_stages(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    before = _used(ctxs)
    t0 = time.perf_counter()
    with pytest.raises(
        DeadlineExceeded,
        match=r"^pipeline 'fan' missed its deadline by \d+\.\d ms while running \(cancelled: "
        r"'tr_left', 'tr_right', 'tr_join'\); give it a later deadline, a higher priority or "
        r"tier, or less work queued ahead of it$",
    ):
        await _fan(host_rt).run({"n": 1000, "delay": 30.0}, deadline=time.monotonic() + 0.1)
    assert 0.09 < time.perf_counter() - t0 < 5
    assert _balanced() and "enter tr_join" not in LOG, LOG
    assert _used(ctxs) == before


async def test_a_stage_returning_the_wrong_model_is_reported(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    p = Pipeline("p", runtime=host_rt).add(wrong)
    with pytest.raises(
        TypeError,
        match=r"^stage 'tr_wrong' \(.*wrong\) produced Total, not Part; return \(or yield\) an "
        r"instance of its output model$",
    ):
        await p.run({"n": 1})


async def test_request_is_validated(host_rt: Runtime, ctxs: dict[str, ExecutionContext]) -> None:
    import pydantic

    p = _fan(host_rt)
    with pytest.raises(pydantic.ValidationError):
        await p.run({"n": "many"})
    with pytest.raises(pydantic.ValidationError):
        await p.run({"n": 1, "extra": 2})
    result = await p.run(p.request_model(n=2, delay=0.0))
    assert result.output == Total(total=6.0)


async def test_a_per_item_stage_reads_a_fixed_value_from_another_branch(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    # vision + streaming LLM -> per-sentence stage: the caption is computed once and read
    # by every item's call
    p = (
        Pipeline("narrate", runtime=host_rt)
        .add("tr_look", id="see", inputs={"prompt": "$input.prompt"})
        .add("tr_words", id="think", inputs={"prompt": "$input.prompt"})
        .add("tr_narrate", id="say", inputs={"text": "think.text", "caption": "see.caption"})
    )
    result = await p.run({"prompt": "cat sat"})
    assert result.output == [Word(text="CAT:cat"), Word(text="CAT:sat")]
    assert result.timings["see"].calls == 1 and result.timings["say"].calls == 2
    # a pipeline whose output runs once streams exactly one item
    items = [item async for item in p.output("see").stream({"prompt": "dog"})]
    assert items == [Scene(caption="DOG")]


# -- sequential chains run inline, in the caller's task -------------------------------------
class Held(BaseModel):
    n: int
    delay: float
    data: Array[np.float32, (None,)]


TASKS: list[object] = []  # the task each inline-test stage ran in
MARK: ContextVar[str] = ContextVar("tr_mark", default="caller")
INNER: list[Pipeline] = []  # a pipeline a stage runs (nested runs)


@stage("tr_make", context="left")
async def make(inp: Job) -> Held:
    with _logged("tr_make"):
        TASKS.append(anyio.get_current_task().id)
        MARK.set("tr_make")  # a stage's variables stay in its run
        data = _ctx().runtime.xp.ones(inp.n, dtype="float32")  # charged to "left"
        return Held(n=inp.n, delay=inp.delay, data=data)


@stage("tr_hold", context="right")
async def hold(inp: Held) -> Part:
    with _logged("tr_hold"):
        TASKS.append(anyio.get_current_task().id)
        assert MARK.get() == "tr_make"  # the stage before it set it, in the same run
        x = _ctx().runtime.xp.full(inp.n, 2, dtype="float32")  # charged to "right"
        await anyio.sleep(inp.delay)
        return Part(value=float(inp.data.sum() + x.sum()))


@stage("tr_half", context="left")
async def half(inp: Part) -> Part:
    with _logged("tr_half"):
        TASKS.append(anyio.get_current_task().id)
        for pipeline in INNER:  # a run inside a stage sees its own request, then ours again
            inner = await pipeline.run({"n": 2, "delay": 0.0})
            assert inner.output == Part(value=2.0)
            req = current_request()
            assert req is not None and (req.pipeline, req.stage_id) == ("chain", "tr_half")
        return Part(value=inp.value / 2)


@pytest.fixture(autouse=True)
def _clear_inline_state() -> Iterator[None]:
    yield
    TASKS.clear()
    INNER.clear()


def _chain(rt: Runtime) -> Pipeline:
    return Pipeline.chain("chain", make, hold, half, runtime=rt)


async def test_a_sequential_chain_runs_in_the_callers_task(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    p = _chain(host_rt)
    assert p.plan.sequential and not _fan(host_rt).plan.sequential
    deadline = time.monotonic() + 60
    result = await p.run({"n": 100, "delay": 0.0}, tier="burstable", priority=2, deadline=deadline)
    assert result.output == Part(value=150.0)
    if pipeline_run._may_run_inline():
        assert TASKS == [anyio.get_current_task().id] * 3  # no task of its own
    else:  # CUDA binders, and this task was created before its loop was hooked
        assert len(TASKS) == 3 and len(set(TASKS)) == 1
        assert TASKS[0] != anyio.get_current_task().id
    assert LOG == [f"{e} {s}" for s in ("tr_make", "tr_hold", "tr_half") for e in ("enter", "exit")]
    info = RequestInfo(QoSPolicy.BURSTABLE, 2, deadline, "chain", "")
    assert SEEN == [replace(info, stage_id=s) for s in ("tr_make", "tr_hold", "tr_half")]
    # what the stages set (sessions, request, their own variables) stays in the run
    assert (current_request(), current_context(), MARK.get()) == (None, None, "caller")
    previous_end = 0.0
    for sid, timing in result.timings.items():
        assert timing.start is not None and timing.end is not None, sid
        assert timing.first_item_at is not None, sid
        assert previous_end <= timing.start <= timing.first_item_at <= timing.end, sid
        assert (timing.items, timing.calls) == (1, 1), sid
        previous_end = timing.end
    assert previous_end <= result.elapsed_s
    assert result.first_output_s == result.timings["tr_half"].first_item_at
    assert ctxs["left"].usage().sessions == 2 and ctxs["right"].usage().sessions == 1


async def test_a_run_inside_a_stage_leaves_the_stage_its_request(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    INNER.append(Pipeline.chain("inner", left, runtime=host_rt))
    result = await _chain(host_rt).run({"n": 4, "delay": 0.0})
    assert result.output == Part(value=6.0)
    assert [info.pipeline for info in SEEN if info is not None] == [
        "chain",
        "chain",
        "chain",
        "inner",
    ]


async def test_a_lone_streaming_stage_runs_inline_and_returns_its_items(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext]
) -> None:
    p = Pipeline("words", runtime=host_rt).add(words)
    assert p.plan.sequential
    result = await p.run({"prompt": "a bb"})
    assert result.output == [Word(text="a"), Word(text="bb")]
    timing = result.timings["tr_words"]
    assert (timing.items, timing.calls) == (2, 1)
    assert result.first_output_s == timing.first_item_at


@pytest.fixture(params=["inline", "task"])
def placement(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Sequential runs inline, and in a task of their own (as where the caller's task may
    not hold sessions: CUDA, a task created before its loop was hooked)."""
    if request.param == "task":
        monkeypatch.setattr(pipeline_run, "_may_run_inline", lambda: False)
    else:  # these tests use the host backend only: no stream to bind, even where CUDA is
        monkeypatch.setattr(_session, "_binders", [])
    return request.param  # type: ignore[no-any-return]


async def test_cancelling_a_sequential_run_frees_its_memory_at_once(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext], placement: str
) -> None:
    before = _used(ctxs)
    tasks_before = _task_ids()
    caller: list[object] = []

    async def run() -> None:
        caller.append(anyio.get_current_task().id)
        await _chain(host_rt).run({"n": 1 << 16, "delay": 30.0})

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, name="caller")
        await anyio.wait_all_tasks_blocked()  # tr_hold is in its 30 s sleep
        assert LOG == ["enter tr_make", "exit tr_make", "enter tr_hold"]
        # inline, the run has no task of its own; else its task is seen, on every backend
        assert _pipeline_tasks() == ([] if placement == "inline" else ["pipeline chain"])
        tg.cancel_scope.cancel()
    assert LOG == ["enter tr_make", "exit tr_make", "enter tr_hold", "exit tr_hold"]
    assert (TASKS[0] == caller[0]) == (placement == "inline")
    # the first stage's output and the second's own array were both released
    assert _used(ctxs) == before
    assert _pipeline_tasks() == []
    assert _task_ids() == tasks_before


async def test_a_sequential_run_past_its_deadline_names_the_stage_it_cut(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext], placement: str
) -> None:
    before = _used(ctxs)
    with pytest.raises(
        DeadlineExceeded,
        match=r"^pipeline 'chain' missed its deadline by \d+\.\d ms while running \(cancelled: "
        r"'tr_hold'\); give it a later deadline, a higher priority or tier, or less work queued "
        r"ahead of it$",
    ):
        # room for the first stages on a loaded machine; tr_hold's 30 s overrun it
        await _chain(host_rt).run({"n": 1 << 16, "delay": 30.0}, deadline=time.monotonic() + 0.5)
    assert _balanced() and "enter tr_half" not in LOG, LOG
    assert _used(ctxs) == before
    with pytest.raises(DeadlineExceeded, match=r"before it started"):
        await _chain(host_rt).run({"n": 4}, deadline=time.monotonic() - 0.01)


@stage("tr_spin", context="left")
async def spin(inp: Job) -> Job:
    with _logged("tr_spin"):
        end = time.perf_counter() + inp.delay
        while time.perf_counter() < end:  # busy, never yielding to the loop
            pass
        return inp


async def test_a_stage_that_never_yields_still_stops_the_next_one_past_the_deadline(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext], placement: str
) -> None:
    p = Pipeline.chain("spun", spin, make, hold, runtime=host_rt)
    with pytest.raises(
        DeadlineExceeded,
        match=r"^pipeline 'spun' missed .* while running \(cancelled: 'tr_make'\); ",
    ):
        # the deadline leaves room to start on a busy machine; the spin overruns it
        await p.run({"n": 8, "delay": 0.4}, deadline=time.monotonic() + 0.15)
    assert LOG == ["enter tr_spin", "exit tr_spin"]


async def test_a_failing_stage_of_a_sequential_run_raises_its_own_error(
    host_rt: Runtime, ctxs: dict[str, ExecutionContext], placement: str
) -> None:
    p = Pipeline.chain("doomed", make, boom, runtime=host_rt)
    with pytest.raises(ValueError, match=r"^boom$"):
        await p.run({"n": 8, "delay": 0.0})
    assert LOG == ["enter tr_make", "exit tr_make", "enter tr_boom", "exit tr_boom"]
    assert current_request() is None and MARK.get() == "caller"
    result = await _chain(host_rt).run({"n": 100, "delay": 0.0})  # and the next run works
    assert result.output == Part(value=150.0)


class _NoStreams:
    """A backend binder with a thread-local current stream that binds nothing."""

    def bind_stream(self, raw: object) -> None:
        return None

    def restore_stream(self, token: object) -> None:
        pass


async def test_only_tasks_that_bind_their_own_stream_run_stages_inline(
    monkeypatch: pytest.MonkeyPatch, anyio_backend_name: str
) -> None:
    monkeypatch.setattr(_session, "_binders", [])  # host backend only: no stream to bind
    assert pipeline_run._may_run_inline()
    monkeypatch.setattr(_session, "_binders", [_NoStreams()])  # as if CUDA were in use
    if anyio_backend_name == "trio":
        assert pipeline_run._may_run_inline()  # trio's instrument binds every task
        return
    hook_event_loop()
    seen: list[bool] = []

    async def probe() -> None:
        seen.append(pipeline_run._may_run_inline())

    async with anyio.create_task_group() as tg:
        tg.start_soon(probe)  # created on a hooked loop: binds its stream at every step
    await asyncio.Task(probe())  # bypasses the task factory, as a task made before the hook
    assert seen == [True, False]
