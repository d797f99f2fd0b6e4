"""capture_graph: replays do the captured work on the same buffers; the fixed-shape decode
step matches the variable-shape one; generate(graph=True) yields the same tokens."""

from __future__ import annotations

import numpy as np
import pytest

from pygpukit import (
    MB,
    InvalidArgument,
    QoSPolicy,
    capture_graph,
    capture_step,
    context_session,
)
from pygpukit.models import LMConfig, TinyLM
from pygpukit.models.layers import to_host
from pygpukit.models.lm import encode
from pygpukit.runtime import Runtime

pytestmark = pytest.mark.anyio


def test_replays_redo_the_work_on_the_same_buffers(rt: Runtime) -> None:
    ctx = rt.create_context("g", max_vram=64 * MB)
    xp = rt.xp
    with context_session(ctx):
        x = xp.zeros((1024,), dtype=xp.float32)
        y = xp.zeros((1024,), dtype=xp.float32)

        def step() -> None:
            tmp = x * 2.0 + 1.0  # a temporary: it must stay the graph's own
            y[...] = tmp + y

        step()  # compile before capturing
        before = ctx.usage().used
        graph = capture_graph(step)
        captured = ctx.usage().used - before
        for i in range(3):
            x.fill(float(i))
            graph.launch()
        ctx.stream.synchronize()
        # y = 1 (eager) + (0*2+1) + (1*2+1) + (2*2+1)
        assert float(to_host(y)[0]) == 1 + 1 + 3 + 5
        if rt.backend.name == "cuda":
            assert captured >= 4096  # the temporary is charged to ctx while the graph lives
        graph.close()
        assert ctx.usage().used == before
        with pytest.raises(InvalidArgument, match="closed"):
            graph.launch()


def test_capture_needs_a_context_and_a_callable(rt: Runtime) -> None:
    with pytest.raises(InvalidArgument, match="context_session"):
        capture_graph(lambda: None)
    ctx = rt.create_context("g", max_vram=MB)
    with context_session(ctx), pytest.raises(InvalidArgument, match="callable"):
        capture_graph(42)  # type: ignore[arg-type]


def _lm(rt: Runtime) -> tuple[TinyLM, object]:
    ctx = rt.create_context("lm", max_vram=512 * MB, qos=QoSPolicy.BURSTABLE)
    big = rt.backend.name == "cuda"
    cfg = LMConfig(d_model=256, n_layers=2, n_heads=4, d_ff=1024) if big else LMConfig()
    with context_session(ctx):
        lm = TinyLM(cfg, xp=rt.xp, seed=3)
    return lm, ctx


def test_fixed_step_matches_the_cached_step(rt: Runtime) -> None:
    lm, ctx = _lm(rt)
    ids = encode("fixed shapes" * 5)  # 61 tokens: the steps cross from one bucket to the next
    with context_session(ctx):  # type: ignore[arg-type]
        cache, logits = lm.prefill(ids)
        step = lm.decoder()
        assert np.allclose(to_host(step.prefill(ids)), to_host(logits))
        tok = 65
        for n in range(5):
            want = to_host(lm.step(tok, cache))
            step.set(tok, len(ids) + n)
            step.advance()  # eager, then captured, then replayed
            assert np.allclose(to_host(step.logits), want, atol=1e-4), n
            tok = int(np.argmax(want))
        assert sorted(step._graphs) == [step.MIN_BUCKET, 2 * step.MIN_BUCKET]
        assert step._runs == 1  # the first step ran, every later one was a graph
        step.close()
        with pytest.raises(ValueError, match="max_len"):
            step.set(1, lm.config.max_len)


async def test_generate_with_graphs_yields_the_same_tokens(rt: Runtime) -> None:
    lm, ctx = _lm(rt)

    def gen(graph: bool) -> list[int]:
        return list(lm.generate("same tokens", 24, temperature=1.0, seed=7, graph=graph))

    eager = await ctx.submit(gen, False)  # type: ignore[attr-defined]
    first = await ctx.submit(gen, True)  # type: ignore[attr-defined]
    again = await ctx.submit(gen, True)  # type: ignore[attr-defined]  (replays the graph)
    assert len(eager) == 24 and eager == first == again
    spares = lm._spare_steps
    assert len(spares) == 1 and len(spares[0]._graphs) == 1  # kept, with its graph


def test_capture_step_replays_a_fixed_shape_step_on_new_inputs(rt: Runtime) -> None:
    ctx = rt.create_context("step", max_vram=64 * MB)
    xp = rt.xp
    with context_session(ctx):
        w = xp.arange(16, dtype=xp.float32).reshape(4, 4)
        step = capture_step(lambda x: x @ w + 1, xp.ones((2, 4), dtype=xp.float32))
        for k in (2.0, 3.0):
            x = xp.full((2, 4), k, dtype=xp.float32)
            got = step(x)
            ctx.stream.synchronize()
            assert float(abs(got - (x @ w + 1)).max()) == 0.0
        with pytest.raises(InvalidArgument, match="captured with 1 input"):
            step(x, x)
        step.close()
