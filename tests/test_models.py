"""The reference models (pygpukit.models): real forward passes, on plain NumPy and on
pygpukit's budgeted ``xp`` inside a context session."""

from __future__ import annotations

import gc
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import pygpukit.models as M
from pygpukit import MB, VRAMBudgetExceeded, context_session
from pygpukit.models import layers as layers_mod
from pygpukit.models import tts as tts_mod
from pygpukit.runtime import Runtime

LM_CFG = M.LMConfig(d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=48, init_std=0.3)
VIT_CFG = M.ViTConfig(image_size=32, patch_size=8, d_model=32, n_layers=2, n_heads=4, d_ff=64)
TTS_CFG = M.TTSConfig(d_model=32, n_conv_layers=2, n_iter=4)


def host(a: Any) -> np.ndarray[Any, Any]:
    return layers_mod.to_host(a)  # type: ignore[no-any-return]


@pytest.fixture(params=["numpy", "pygpukit-host"])
def xp(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Plain NumPy, or pygpukit's host ``xp`` inside a context session."""
    if request.param == "numpy":
        yield np
        return
    runtime = Runtime(backend="host", vram_limit=1 << 30)
    try:
        ctx = runtime.create_context("models", max_vram=256 * MB)
        with context_session(ctx):
            yield runtime.xp
    finally:
        runtime.close()


# --------------------------------------------------------------------------- TinyLM


def test_lm_kv_cache_matches_full_logits(xp: Any) -> None:
    lm = M.TinyLM(LM_CFG, xp=xp, seed=1)
    tokens = [M.BOS, *b"The cache must agree."]
    full = host(lm.logits_full(tokens))
    for prefill in (1, 6, len(tokens)):
        cached = host(lm.logits_cached(tokens, prefill=prefill))
        assert cached.shape == full.shape == (len(tokens), M.VOCAB_SIZE)
        np.testing.assert_allclose(cached, full, rtol=1e-4, atol=1e-4)
    # The check is sensitive: the last position depends on the prefix, so a cache that lost
    # or misplaced earlier keys would not pass.
    other = host(lm.logits_full([M.BOS, ord("X"), *tokens[2:]]))
    assert np.abs(other[-1] - full[-1]).max() > 1e-2


def test_generate_prefills_once_then_steps_one_token(
    xp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = M.TinyLM(LM_CFG, xp=xp)
    calls: list[tuple[int, int, bool]] = []
    real = lm._forward

    def spy(tokens: Any, cache: Any, start: int = 0) -> Any:
        calls.append((len(tokens), start, cache is not None))
        return real(tokens, cache, start)

    monkeypatch.setattr(lm, "_forward", spy)
    out = list(lm.generate("hello", 6))
    assert len(out) == 6
    prompt_len = 1 + len(b"hello")
    assert calls[0] == (prompt_len, 0, True)
    assert calls[1:] == [(1, prompt_len + i, True) for i in range(5)]


def test_greedy_generation_is_deterministic_and_matches_uncached_reference(xp: Any) -> None:
    a = M.TinyLM(LM_CFG, xp=xp, seed=3)
    b = M.TinyLM(LM_CFG, xp=xp, seed=3)
    out = list(a.generate("Once upon", 12))
    assert out == list(b.generate("Once upon", 12))
    assert len(out) >= 4 and all(isinstance(t, int) and 0 <= t < 256 for t in out)
    # reference: greedy decoding that recomputes the whole sequence each step (EOS ends it)
    seq = [M.BOS, *b"Once upon"]
    ref = []
    for _ in range(12):
        row = host(a.logits_full(seq))[-1].astype(np.float64)
        row[M.BOS] = -np.inf
        tok = int(np.argmax(row))
        if tok == M.EOS:
            break
        ref.append(tok)
        seq.append(tok)
    assert out == ref
    assert out != list(M.TinyLM(LM_CFG, xp=xp, seed=4).generate("Once upon", 12))


def test_sampling_is_seeded(xp: Any) -> None:
    lm = M.TinyLM(LM_CFG, xp=xp)
    first = list(lm.generate("abc", 16, temperature=1.0, seed=7))
    assert first == list(lm.generate("abc", 16, temperature=1.0, seed=7))
    assert first != list(lm.generate("abc", 16, temperature=1.0, seed=8))


def test_lm_output_shapes_dtypes_and_limits(xp: Any) -> None:
    lm = M.TinyLM(LM_CFG, xp=xp)
    logits = lm.logits_full([M.BOS, 1, 2, 3])
    assert logits.shape == (4, M.VOCAB_SIZE) and logits.dtype == np.float32
    assert np.isfinite(host(logits)).all()
    cache, last = lm.prefill([M.BOS, 1, 2])
    assert last.shape == (M.VOCAB_SIZE,) and last.dtype == np.float32
    assert cache.length == 3 and all(k.dtype == np.float32 for k in cache.keys)
    assert lm.step(5, cache).shape == (M.VOCAB_SIZE,) and cache.length == 4
    # a prompt longer than the context is cut; generation stops when the cache is full
    out = list(lm.generate("x" * 100, 50))
    assert 0 < len(out) <= 2
    assert list(lm.generate("hi", 0)) == []
    with pytest.raises(ValueError, match="max_len"):
        lm.logits_full([M.BOS] * (LM_CFG.max_len + 1))
    with pytest.raises(ValueError, match="token ids"):
        lm.logits_full([M.BOS, 999])
    with pytest.raises(ValueError, match="multiple"):
        M.LMConfig(d_model=30, n_heads=4)


def test_sentences_split_on_punctuation_and_length(monkeypatch: pytest.MonkeyPatch) -> None:
    lm = M.TinyLM(LM_CFG)
    chunks = list(lm.sentences("Tell me", 30, max_chunk=8))
    assert chunks and all(isinstance(c, str) and 0 < len(c) <= 8 for c in chunks)

    def fake_generate(prompt: str, n: int, **_: Any) -> Iterator[int]:
        yield from b"Hi. Who? abcdefghij ok"

    monkeypatch.setattr(lm, "generate", fake_generate)
    assert list(lm.sentences("", 0, max_chunk=6)) == ["Hi.", " Who?", " abcde", "fghij ", "ok"]


# --------------------------------------------------------------------------- TinyViT


def test_vit_embedding_and_caption(xp: Any) -> None:
    vit = M.TinyViT(VIT_CFG, xp=xp)
    img = vit.random_image(0)
    emb = vit.embed(img)
    assert emb.shape == (VIT_CFG.d_model,) and emb.dtype == np.float32
    assert np.isfinite(host(emb)).all()
    cap = vit.caption(img)
    assert isinstance(cap, str) and cap.startswith("a ") and len(cap.split()) >= 3
    assert cap == vit.caption(img)
    dark = np.zeros((32, 32, 3), dtype=np.float32)
    assert not np.allclose(host(vit.embed(dark)), host(emb))
    with pytest.raises(ValueError, match="image shape"):
        vit.embed(np.zeros((16, 16, 3), dtype=np.float32))


# --------------------------------------------------------------------------- TinyTTS


def test_tts_mel_and_waveform(xp: Any) -> None:
    tts = M.TinyTTS(TTS_CFG, xp=xp)
    text = "Hello there, world."
    n_sym = len(tts_mod.text_to_ids(text))
    mel = tts.mel(text)
    frames = n_sym * TTS_CFG.frames_per_char
    assert mel.shape == (frames, 80) and mel.dtype == np.float32
    m = host(mel)
    assert np.isfinite(m).all() and m.min() >= math.exp(-8) * 0.99 and m.max() <= 1.0
    wav = tts.synthesize(text)
    w = host(wav)
    assert wav.dtype == np.float32 and w.ndim == 1
    assert abs(len(w) - frames * TTS_CFG.hop_length) <= TTS_CFG.hop_length
    assert np.isfinite(w).all() and np.abs(w).max() <= 1.0 and np.abs(w).max() > 0.5
    assert TTS_CFG.sample_rate == 22050
    np.testing.assert_array_equal(w, host(tts.synthesize(text)))  # deterministic
    assert tts.mel("").shape == (0, 80) and tts.synthesize("  ").shape == (0,)


def test_text_to_ids_is_phoneme_ish() -> None:
    ids = tts_mod.text_to_ids("  The SHIP!  ")
    syms = [tts_mod.SYMBOLS[i] for i in ids]
    assert syms == ["th", "e", " ", "sh", "i", "p", "!"]
    assert tts_mod.text_to_ids("a\u00e9\u4e2db") == tts_mod.text_to_ids("a b")


def test_mel_filterbank_and_its_pseudo_inverse() -> None:
    fb = M.mel_filterbank(22050, 1024, 80)
    assert fb.shape == (80, 513) and fb.dtype == np.float32
    assert (fb >= 0).all() and (fb.sum(axis=1) > 0).all()
    np.testing.assert_allclose(fb @ np.linalg.pinv(fb), np.eye(80), atol=1e-3)


def _sine(sr: int = 22050, seconds: float = 0.5) -> np.ndarray[Any, Any]:
    t = np.arange(int(sr * seconds)) / sr
    return (0.5 * np.sin(2 * np.pi * 440 * t) + 0.3 * np.sin(2 * np.pi * 1250 * t)).astype(
        np.float32
    )


def test_stft_istft_round_trip(xp: Any) -> None:
    x = xp.asarray(_sine())
    win = tts_mod.hann_window(xp, 1024)
    spec = tts_mod.stft(xp, x, n_fft=1024, hop=256, window=win)
    assert spec.shape == (1 + x.shape[0] // 256, 513) and spec.dtype == np.complex64
    y = tts_mod.istft(xp, spec, n_fft=1024, hop=256, window=win)
    assert y.dtype == np.float32 and y.shape[0] == (spec.shape[0] - 1) * 256
    np.testing.assert_allclose(host(y), host(x)[: y.shape[0]], atol=1e-5)


def test_griffin_lim_reconstructs_a_sine(xp: Any) -> None:
    x = xp.asarray(_sine())
    win = tts_mod.hann_window(xp, 1024)
    target = xp.abs(tts_mod.stft(xp, x, n_fft=1024, hop=256, window=win))

    def sc(n_iter: int) -> float:
        y = M.griffin_lim(xp, target, n_fft=1024, hop=256, n_iter=n_iter, window=win)
        assert y.dtype == np.float32
        est = xp.abs(tts_mod.stft(xp, y, n_fft=1024, hop=256, window=win))
        return M.spectral_convergence(xp, target, est)

    random_phase, converged = sc(0), sc(32)
    assert converged < 0.2
    assert random_phase > 0.4 and converged < random_phase / 3


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    ("cls", "cfg"), [("TinyLM", LM_CFG), ("TinyViT", VIT_CFG), ("TinyTTS", TTS_CFG)]
)
def test_save_load_round_trip_is_exact(xp: Any, tmp_path: Path, cls: str, cfg: Any) -> None:
    model = getattr(M, cls)(cfg, xp=xp, seed=11)
    path = tmp_path / "weights.npz"
    model.save(path)
    again = getattr(M, cls).load(path, xp=xp)
    assert again.config == model.config
    assert again.params.keys() == model.params.keys()
    for name, arr in model.params.items():
        assert again.params[name].dtype == np.float32
        np.testing.assert_array_equal(host(again.params[name]), host(arr), err_msg=name)
    assert again.nbytes == model.nbytes == 4 * model.n_params
    fresh = getattr(M, cls)(cfg, xp=xp, seed=12)
    assert any(not np.array_equal(host(fresh.params[k]), host(v)) for k, v in model.params.items())
    with pytest.raises(ValueError, match="holds a"):
        (M.TinyViT if cls != "TinyViT" else M.TinyLM).load(path, xp=xp)


def test_save_load_safetensors(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    lm = M.TinyLM(LM_CFG, seed=5)
    path = tmp_path / "lm.safetensors"
    lm.save(path)
    again = M.TinyLM.load(path)
    for name, arr in lm.params.items():
        np.testing.assert_array_equal(again.params[name], arr)


def test_default_sizes() -> None:
    assert M.TinyLM().n_params == 462_592
    assert M.TinyViT().n_params == 437_120
    assert M.TinyTTS().n_params == 265_936


# --------------------------------------------------------------------------- budgets


def test_weights_are_charged_to_the_session_context(rt: Runtime) -> None:
    ctx = rt.create_context("models", max_vram=64 * MB)
    with context_session(ctx):
        xp = rt.xp
        before = ctx.usage().used
        models = [M.TinyLM(LM_CFG, xp=xp), M.TinyViT(VIT_CFG, xp=xp), M.TinyTTS(TTS_CFG, xp=xp)]
        weights = sum(m.nbytes for m in models)
        assert weights > 0
        assert ctx.usage().used - before >= weights
        list(models[0].generate("hi", 4))
        models[1].caption(models[1].random_image())
        models[2].synthesize("hi")
        assert ctx.usage().used - before >= weights  # still alive, still charged
        del models
        gc.collect()
        if rt.backend.name == "host":
            assert ctx.usage().used <= before


def test_weights_over_budget_are_refused(rt: Runtime) -> None:
    small = rt.create_context("tiny", max_vram=64 * 1024)
    with context_session(small), pytest.raises(VRAMBudgetExceeded):
        M.TinyLM(xp=rt.xp)  # 1.8 MB of weights into a 64 KiB budget
