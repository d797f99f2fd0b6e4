"""The decode-step kernels (pygpukit.models._gemv) against plain NumPy references, and the
decode loop that queues steps ahead of the token it reads. On the host backend the
array-level versions are tested; on CUDA the kernels."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from pygpukit import MB, QoSPolicy, context_session
from pygpukit.models import LMConfig, TinyLM
from pygpukit.models import _gemv as K
from pygpukit.models.layers import attention, to_host
from pygpukit.models.lm import BOS, VOCAB_SIZE, FixedStep, encode
from pygpukit.runtime import Runtime

pytestmark = pytest.mark.anyio

RNG = np.random.default_rng(11)


def _dev(xp: Any, a: np.ndarray[Any, Any]) -> Any:
    return xp.asarray(a)


def test_vecmat_adds_bias_and_residual(rt: Runtime) -> None:
    ctx = rt.create_context("k", max_vram=64 * MB)
    x, w = (
        RNG.standard_normal((1, 300), dtype=np.float32),
        RNG.standard_normal((300, 200), dtype=np.float32),
    )
    b, r = (
        RNG.standard_normal(200, dtype=np.float32),
        RNG.standard_normal((1, 200), dtype=np.float32),
    )
    with context_session(ctx):
        xp = rt.xp
        dx, dw, db, dr = (_dev(xp, a) for a in (x, w, b, r))
        for bias, res, want in (
            (None, None, x @ w),
            (db, None, x @ w + b),
            (db, dr, r + x @ w + b),
            (None, dr, r + x @ w),
        ):
            got = to_host(K.vecmat(xp, dx, dw, bias, res))
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        out = xp.zeros((200,), dtype=xp.float32)
        e = np.ascontiguousarray(w.T)
        assert K.vecmat_t(xp, dx, _dev(xp, e), out=out) is out
        np.testing.assert_allclose(to_host(out), (x @ e.T)[0], rtol=1e-4, atol=1e-4)


def test_embed_row_adds_the_token_and_position_rows(rt: Runtime) -> None:
    ctx = rt.create_context("k", max_vram=64 * MB)
    tok, pos = (
        RNG.standard_normal((50, 96), dtype=np.float32),
        RNG.standard_normal((20, 96), dtype=np.float32),
    )
    with context_session(ctx):
        xp = rt.xp
        t, p = xp.asarray(np.array([41])), xp.asarray(np.array([7]))
        got = to_host(K.embed_row(xp, _dev(xp, tok), _dev(xp, pos), t, p))
    np.testing.assert_array_equal(got, (tok[41] + pos[7])[None, :])


@pytest.mark.parametrize(("pos", "rows"), [(0, 64), (37, 64), (63, 64), (100, 128)])
def test_attend_row_writes_the_cache_row_and_attends_up_to_it(
    rt: Runtime, pos: int, rows: int
) -> None:
    heads, dh, max_len = 4, 32, 128
    d = heads * dh
    qkv = RNG.standard_normal((1, 3 * d), dtype=np.float32)
    kc = RNG.standard_normal((heads, max_len, dh), dtype=np.float32)
    vc = RNG.standard_normal((heads, max_len, dh), dtype=np.float32)
    ctx = rt.create_context("k", max_vram=64 * MB)
    with context_session(ctx):
        xp = rt.xp
        dk, dv = _dev(xp, kc), _dev(xp, vc)
        got = to_host(K.attend_row(xp, _dev(xp, qkv), dk, dv, xp.asarray(np.array([pos])), rows))
        kc_after, vc_after = to_host(dk), to_host(dv)
    heads_of = lambda a: a.reshape(heads, 1, dh)  # noqa: E731
    kc[:, pos], vc[:, pos] = heads_of(qkv[:, d : 2 * d])[:, 0], heads_of(qkv[:, 2 * d :])[:, 0]
    np.testing.assert_array_equal(kc_after, kc)  # only row pos changed
    np.testing.assert_array_equal(vc_after, vc)
    want = attention(np, heads_of(qkv[:, :d]), kc[:, : pos + 1], vc[:, : pos + 1])
    np.testing.assert_allclose(got, want.reshape(1, d), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_sample_row_picks_what_the_host_sampler_picks(rt: Runtime, temperature: float) -> None:
    """The device sampler takes the prompt's tokens while the prompt lasts, then the same
    token as TinyLM._pick from the same noise; the position moves on each time and sampled
    tokens land where the host can read them."""
    ctx = rt.create_context("k", max_vram=64 * MB)
    rows, prompt = 4, np.array([3, 14, 15, 92], dtype=np.int64)
    host_rng, dev_rng = np.random.default_rng(5), np.random.default_rng(5)
    noise = dev_rng.gumbel(size=(rows, VOCAB_SIZE))
    tokens = np.full((9,), -1, dtype=np.int32) if rt.backend.name == "host" else None
    with context_session(ctx):
        xp = rt.xp
        if tokens is None:
            import cupyx

            tokens = cupyx.empty_pinned((9,), dtype=np.int32)
            tokens[...] = -1
        token, pos, n = (xp.zeros((1,), dtype=xp.int64) for _ in range(3))
        args = (xp.asarray(np.array([temperature])), token, pos, n, xp.asarray(prompt))
        plen = xp.asarray(np.array([len(prompt)]))
        dnoise = xp.asarray(noise)

        def sample(logits: np.ndarray[Any, Any]) -> None:
            K.sample_row(xp, xp.asarray(logits), dnoise, *args, plen, tokens, BOS)
            ctx.stream.synchronize()

        for p in range(len(prompt) - 1):  # the prompt: its tokens, nothing sampled
            sample(RNG.standard_normal(VOCAB_SIZE, dtype=np.float32))
            assert int(to_host(token)[0]) == prompt[p + 1] and int(to_host(pos)[0]) == p + 1
        assert int(to_host(n)[0]) == 0 and (tokens == -1).all()
        for k in range(rows):
            logits = RNG.standard_normal(VOCAB_SIZE, dtype=np.float32) * 3
            logits[BOS] = 50.0  # never picked
            if k == 2:
                logits[7] = logits[9] = 40.0  # a tie: the lower index
            if k == 3:
                logits[[11, 12]] = np.nan  # as numpy.argmax: the first NaN wins
            sample(logits)
            want = TinyLM._pick(logits, temperature, host_rng)
            assert int(tokens[k]) == want == int(to_host(token)[0]), k
            if k == 2 and temperature == 0:
                assert want == 7
            if k == 3:  # a NaN row entry wins at any temperature, the first one
                assert want == 11
            if k in (0, 1) and temperature == 0:  # greedy: the largest logit but BOS's
                assert want == max(set(range(VOCAB_SIZE)) - {BOS}, key=lambda i: logits[i])
        assert (int(to_host(pos)[0]), int(to_host(n)[0])) == (len(prompt) - 1 + rows, rows)
        nan_row = np.full(VOCAB_SIZE, np.nan, dtype=np.float32)  # a diverged model
        n.fill(0)
        sample(nan_row)
        assert int(tokens[0]) == TinyLM._pick(nan_row, temperature, host_rng) == 0  # not BOS


def _small_lm(rt: Runtime, max_len: int = 96) -> tuple[TinyLM, Any]:
    ctx = rt.create_context("lm", max_vram=256 * MB, qos=QoSPolicy.BURSTABLE)
    cfg = LMConfig(d_model=64, n_layers=2, n_heads=4, d_ff=128, max_len=max_len, init_std=0.3)
    with context_session(ctx):
        lm = TinyLM(cfg, xp=rt.xp, seed=2)
    return lm, ctx


async def test_queued_steps_end_where_the_eager_loop_ends(rt: Runtime) -> None:
    """Near max_len, at EOS and when the reader stops early, the graph loop yields what the
    eager loop yields, and a generation after an abandoned one is not disturbed by the steps
    the abandoned one had queued."""
    lm, ctx = _small_lm(rt)

    def run(
        prompt: str, n: int, graph: bool, temperature: float = 1.0, take: int = -1
    ) -> list[int]:
        out = []
        for tok in lm.generate(prompt, n, temperature=temperature, seed=3, graph=graph):
            if len(out) == take:
                break
            out.append(tok)
        return out

    near_end = "x" * (lm.config.max_len - 4)  # BOS + 92 bytes: 3 more positions, 4 tokens
    eager = await ctx.submit(run, near_end, 50, False)
    assert 1 <= len(eager) <= 4
    assert await ctx.submit(run, near_end, 50, True) == eager
    full = await ctx.submit(run, "hello", 40, False)
    assert await ctx.submit(run, "hello", 40, True, 1.0, 3) == full[:3]  # abandoned early
    assert await ctx.submit(run, "hello", 40, True) == full
    greedy = await ctx.submit(run, "hello", 40, False, 0.0)
    assert await ctx.submit(run, "hello", 40, True, 0.0) == greedy
    long = await ctx.submit(run, "hi", 90, False)  # past 64 tokens: a second block of noise
    assert len(long) > FixedStep.NOISE_ROWS
    assert await ctx.submit(run, "hi", 90, True) == long


def test_a_step_past_max_len_is_refused(rt: Runtime) -> None:
    lm, ctx = _small_lm(rt)
    with context_session(ctx):
        step = FixedStep(lm)
        step.set(5, lm.config.max_len - 1)
        step.advance()  # the last position; it samples the next token and moves pos on
        with pytest.raises(ValueError, match="full"):
            step.advance()
        step.close()


def test_eos_stops_the_queued_loop(rt: Runtime) -> None:
    """A model whose head always prefers EOS stops at once, graph or not."""
    lm, ctx = _small_lm(rt)
    xp = rt.xp
    with context_session(ctx):
        d = lm.config.d_model
        lm.params["ln_f.g"][...] = xp.zeros((d,), dtype=xp.float32)  # final x = ln_f.b
        lm.params["ln_f.b"][...] = xp.ones((d,), dtype=xp.float32)
        lm.params["tok_emb"][257] = xp.full((d,), 5.0, dtype=xp.float32)  # EOS: 5 * d
        for temperature in (0.0, 1.0):
            assert list(lm.generate("stop", 10, temperature=temperature, graph=False)) == []
            assert list(lm.generate("stop", 10, temperature=temperature, graph=True)) == []


def test_token_at_refuses_what_was_not_queued(rt: Runtime) -> None:
    lm, ctx = _small_lm(rt)
    with context_session(ctx):
        step = FixedStep(lm)
        ids = encode("abc")
        step.start(ids, 0.0, np.random.default_rng(0))
        assert 0 <= step.token_at(0) < VOCAB_SIZE
        with pytest.raises(ValueError, match="queued"):
            step.token_at(1)
        for _ in range(FixedStep.LOOKAHEAD + 3):
            step.next()
        with pytest.raises(ValueError, match="queued"):
            step.token_at(0)  # its mark has been reused
        step.close()
