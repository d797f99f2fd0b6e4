"""Stand-ins for the user's model code in the seed's snippets: real array work, plus checks
that the work ran where the snippet's comments say it does. Loaded into each snippet's
namespace by test_seed.py.
"""

from __future__ import annotations

import asyncio
import time

import pygpukit
from pygpukit import current_context, current_stream
from pygpukit.benchmarks._common import busy_kernel

CALLS: list[tuple[str, str]] = []


def _in_session(what: str):  # type: ignore[no-untyped-def]
    ctx = current_context()
    assert ctx is not None, f"{what} ran outside any context_session"
    assert current_stream() is ctx.stream
    if ctx.runtime.backend.name == "cuda":
        import cupy

        assert cupy.cuda.get_current_stream().ptr == ctx.stream.id, (
            f"{what}: CuPy's current stream is not {ctx.name}'s"
        )
    CALLS.append((what, ctx.name))
    return ctx


def _work(ctx, n: int = 128) -> float:  # type: ignore[no-untyped-def]
    """Real array work whose inputs are charged to ``ctx`` while they live."""
    xp = pygpukit.xp
    before = ctx.usage().used
    a = xp.ones((n, n), dtype=xp.float32)
    assert ctx.usage().used >= before + a.nbytes, "the allocation was not charged to the context"
    b = a @ a
    return float(b[0, 0])


def _busy(ctx, seconds: float) -> None:  # type: ignore[no-untyped-def]
    """Occupy the context's stream for a while (a spin kernel, or a host item)."""
    busy_kernel(ctx.runtime)(ctx.stream, seconds)


def run_llm_inference(prompt: str) -> str:
    ctx = _in_session("run_llm_inference")
    return f"{prompt}: {_work(ctx)}"


def run_tts(text: str) -> list[float]:
    ctx = _in_session("run_tts")
    return [_work(ctx)]


async def _async_model(name: str, arg: str) -> str:
    ctx = _in_session(name)
    value = _work(ctx)
    await current_stream()  # the GPU work is done; the loop ran others meanwhile
    assert current_context() is ctx
    await asyncio.sleep(0)
    _in_session(name)
    return f"{name}({arg})={value}"


async def llm_inference_async(prompt: str) -> str:
    return await _async_model("llm_inference_async", prompt)


async def tts_synthesis_async(text: str) -> str:
    return await _async_model("tts_synthesis_async", text)


async def generate_response(user_input: str) -> str:
    return await _async_model("generate_response", user_input)


async def analyze_images(user_input: str) -> str:
    return await _async_model("analyze_images", user_input)


async def synthesize_speech(text: str) -> str:
    return await _async_model("synthesize_speech", text)


def produce_data():  # type: ignore[no-untyped-def]
    """Fill an array on the producer's stream, late: the consumer must wait for it."""
    ctx = _in_session("produce_data")
    xp = pygpukit.xp
    out = xp.zeros(1 << 16, dtype=xp.float32)
    if ctx.runtime.backend.name == "host":
        ctx.stream.launch_host_func(lambda: (time.sleep(0.1), out.fill(7)))
    else:
        _busy(ctx, 0.1)
        out.fill(7)
    return out


def consume_data(result) -> float:  # type: ignore[no-untyped-def]
    """Read the array on the consumer's stream; it must see the producer's values."""
    ctx = _in_session("consume_data")
    if ctx.runtime.backend.name == "host":
        seen: list[float] = []
        ctx.stream.launch_host_func(lambda: seen.append(float(result.sum())))
        ctx.stream.synchronize()
        total = seen[0]
    else:
        total = float(result.sum())  # runs on the consumer's stream, then syncs it
    assert total == 7 * (1 << 16), f"consumer read {total}: it did not wait for the producer"
    CALLS.append(("consumed", ctx.name))
    return total
