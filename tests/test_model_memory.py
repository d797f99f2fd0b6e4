"""A finished request's KV cache is freed by reference counting (issue 17, bug 7).

Every test runs with the garbage collector off: memory that only the collector would free
stays charged to its context, which is what a loaded server saw (its ``*-llm`` contexts
5-23 MB above idle until ``gc.collect()``).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import anyio
import pytest

from pygpukit import MB, context_session
from pygpukit.examples import build_assistant
from pygpukit.models import TinyLM
from pygpukit.runtime import QoSPolicy, Runtime


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_concurrent_generations_leave_only_the_spare_step(host_rt: Runtime, no_gc: None) -> None:
    ctx = host_rt.create_context("m-llm", max_vram=64 * MB)
    with context_session(ctx):
        lm = TinyLM(xp=host_rt.xp, seed=1)
        weights = ctx.usage().used
        list(lm.generate("warm", 20, temperature=1.0, graph=True))
        idle = ctx.usage().used  # the weights and one spare decode step (cache and graphs)
        assert idle > weights
        a = lm.generate("first", 20, temperature=1.0, graph=True)
        b = lm.generate("second", 20, temperature=1.0, graph=True)
        for _ in zip(a, b, strict=False):  # two at once: the second makes a step of its own
            assert ctx.usage().used > idle
        list(a), list(b)  # (whichever stopped first at EOS)
        del a, b
        assert ctx.usage().used == idle
        list(lm.generate("plain", 20, temperature=1.0))  # the uncaptured path too
        assert ctx.usage().used == idle


def test_a_dropped_model_frees_its_weights_and_spare_step(host_rt: Runtime, no_gc: None) -> None:
    ctx = host_rt.create_context("m-llm", max_vram=64 * MB)
    with context_session(ctx):
        lm = TinyLM(xp=host_rt.xp, seed=1)
        list(lm.generate("warm", 20, temperature=1.0, graph=True))
        assert ctx.usage().used > 0
        del lm
        assert ctx.usage().used == 0


@pytest.mark.anyio
async def test_streamed_requests_leave_the_llm_context_at_idle(no_gc: None) -> None:
    with Runtime(backend="host") as rt:
        pipe = build_assistant(rt, "a", QoSPolicy.GUARANTEED)
        llm = rt.get_context("a-llm")
        await pipe.run({"prompt": "Warm up.", "max_new_tokens": 100})
        idle = llm.usage().used

        async def one(i: int) -> None:
            result = await pipe.run({"prompt": f"Request {i}.", "max_new_tokens": 100})
            assert result.output  # it said something

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(4):  # their sentences interleave on the launcher thread
                    tg.start_soon(one, i)
        assert llm.usage().used == idle
