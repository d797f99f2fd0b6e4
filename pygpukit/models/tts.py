"""TinyTTS: text → mel spectrogram → waveform (Griffin-Lim).

The acoustic model's weights are **random** by default (``init_weights(seed)``): the output
is real audio produced by a real pipeline — symbol embedding, a small convolutional acoustic
model, mel → linear spectrogram through the pseudo-inverse of a mel filterbank, Griffin-Lim
phase reconstruction with an FFT-based STFT/ISTFT — but an untrained model makes noise, not
speech.

Default size (``TTSConfig()``): 64 symbols, d_model 128, 3 conv layers of kernel 5,
4 frames per symbol, 80 mels → 265,936 parameters, 1,063,744 bytes of float32 weights; plus
the mel filterbank, its pseudo-inverse and the Hann window as fixed buffers (332,416 bytes).
Audio: 22,050 Hz, n_fft 1024, hop 256, 16 Griffin-Lim iterations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .layers import Model, ParamSpec, conv1d_same, gelu, layer_norm, to_host

__all__ = (
    "SYMBOLS",
    "TTSConfig",
    "TinyTTS",
    "griffin_lim",
    "hann_window",
    "istft",
    "mel_filterbank",
    "spectral_convergence",
    "stft",
    "text_to_ids",
)

# id 0 is padding/silence; then single characters, then a few digraphs that are one sound.
_CHARS = " abcdefghijklmnopqrstuvwxyz'.,!?-"
_DIGRAPHS = ("th", "sh", "ch", "ng", "ph", "wh", "ck", "ee", "oo", "ou", "ai", "oa")
SYMBOLS: tuple[str, ...] = ("<pad>", *_CHARS, *_DIGRAPHS)
_SYMBOL_ID = {s: i for i, s in enumerate(SYMBOLS)}
_SPACE = _SYMBOL_ID[" "]


def text_to_ids(text: str) -> list[int]:
    """Phoneme-ish symbol ids of ``text``.

    Lower-cases, maps common digraphs (``th``, ``sh``, ``ee`` ...) to one symbol each, other
    known characters to theirs, anything else to a space; runs of spaces collapse and
    leading/trailing spaces are dropped. Ids are in ``[1, len(SYMBOLS))``.
    """
    s = text.lower()
    ids: list[int] = []
    i = 0
    while i < len(s):
        pair = s[i : i + 2]
        if pair in _SYMBOL_ID and len(pair) == 2:
            ids.append(_SYMBOL_ID[pair])
            i += 2
            continue
        sid = _SYMBOL_ID.get(s[i], _SPACE)
        if not (sid == _SPACE and (not ids or ids[-1] == _SPACE)):
            ids.append(sid)
        i += 1
    while ids and ids[-1] == _SPACE:
        ids.pop()
    return ids


# --------------------------------------------------------------------------- DSP


def _hz_to_mel(f: Any) -> Any:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (math.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: Any) -> Any:
    m = np.asarray(m, dtype=np.float64)
    lin = m * (200.0 / 3)
    log = 1000.0 * np.exp((math.log(6.4) / 27.0) * (m - 15.0))
    return np.where(m >= 15.0, log, lin)


def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray[Any, Any]:
    """Triangular, area-normalised (Slaney) mel filters, ``(n_mels, n_fft // 2 + 1)`` float32.

    Built in NumPy on the host (the same construction as librosa's default).
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    if not 0.0 <= fmin < fmax <= sample_rate / 2.0:
        raise ValueError("need 0 <= fmin < fmax <= sample_rate / 2")
    freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(hz)
    ramps = hz[:, None] - freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    fb = np.maximum(0.0, np.minimum(lower, upper))
    fb *= (2.0 / (hz[2 : n_mels + 2] - hz[:n_mels]))[:, None]
    out: np.ndarray[Any, Any] = np.asarray(fb, dtype=np.float32)
    return out


def hann_window(xp: Any, n_fft: int) -> Any:
    """Periodic Hann window of length ``n_fft`` on ``xp`` (float32)."""
    n = np.arange(n_fft, dtype=np.float64)
    host = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / n_fft)).astype(np.float32)
    return xp.array(host, dtype=xp.float32)


def stft(xp: Any, x: Any, *, n_fft: int, hop: int, window: Any) -> Any:
    """Centred (zero-padded) STFT of a 1-D signal: ``(1 + len(x) // hop, n_fft // 2 + 1)``
    complex64, with ``xp.fft.rfft``."""
    pad = n_fft // 2
    z = xp.zeros((pad,), dtype=xp.float32)
    xpad = xp.concatenate([z, xp.asarray(x, dtype=xp.float32), z])
    n_frames = 1 + int(x.shape[0]) // hop
    idx = xp.arange(n_frames)[:, None] * hop + xp.arange(n_fft)[None, :]
    frames = xp.take(xpad, idx) * window
    return xp.fft.rfft(frames, axis=-1).astype(xp.complex64)


def istft(xp: Any, spec: Any, *, n_fft: int, hop: int, window: Any) -> Any:
    """Inverse of :func:`stft` (weighted overlap-add, ``xp.fft.irfft``): a float32 signal of
    ``(frames - 1) * hop`` samples. Needs ``n_fft % hop == 0``."""
    if n_fft % hop:
        raise ValueError("istft needs n_fft to be a multiple of hop")
    n_frames = int(spec.shape[0])
    if n_frames == 0:
        return xp.zeros((0,), dtype=xp.float32)
    r = n_fft // hop
    frames = xp.fft.irfft(spec, n=n_fft, axis=-1).astype(xp.float32) * window
    frames = frames.reshape(n_frames, r, hop)
    w2 = (window * window).reshape(r, hop)
    out = xp.zeros((n_frames + r - 1, hop), dtype=xp.float32)
    norm = xp.zeros((n_frames + r - 1, hop), dtype=xp.float32)
    for j in range(r):
        out[j : j + n_frames] += frames[:, j, :]
        norm[j : j + n_frames] += w2[j]
    y = out.reshape(-1)
    wsum = norm.reshape(-1)
    y = xp.where(wsum > 1e-8, y / xp.maximum(wsum, 1e-8), 0.0).astype(xp.float32)
    pad = n_fft // 2
    return y[pad : pad + (n_frames - 1) * hop]


def griffin_lim(
    xp: Any,
    magnitude: Any,
    *,
    n_fft: int = 1024,
    hop: int = 256,
    n_iter: int = 16,
    momentum: float = 0.99,
    seed: int = 0,
    window: Any = None,
) -> Any:
    """Waveform whose STFT magnitude approximates ``magnitude`` (``(frames, n_fft//2+1)``).

    Fast Griffin-Lim (Perraudin et al. 2013; ``momentum=0`` is the classic algorithm) from a
    random initial phase drawn with ``numpy.random.default_rng(seed)``. Returns float32,
    ``(frames - 1) * hop`` samples.
    """
    if n_iter < 0:
        raise ValueError("n_iter must be >= 0")
    mag = xp.asarray(magnitude, dtype=xp.float32)
    if mag.ndim != 2 or int(mag.shape[1]) != n_fft // 2 + 1:
        raise ValueError(f"magnitude must be (frames, {n_fft // 2 + 1}), got {mag.shape}")
    if window is None:
        window = hann_window(xp, n_fft)
    rng = np.random.default_rng(seed)
    phase0 = np.exp(2j * np.pi * rng.random(tuple(mag.shape))).astype(np.complex64)
    angles = xp.array(phase0, dtype=xp.complex64)
    rebuilt = None
    alpha = momentum / (1.0 + momentum)
    for _ in range(n_iter):
        y = istft(xp, mag * angles, n_fft=n_fft, hop=hop, window=window)
        new = stft(xp, y, n_fft=n_fft, hop=hop, window=window)
        angles = new if rebuilt is None else new - alpha * rebuilt
        rebuilt = new
        angles = angles / (xp.abs(angles) + 1e-8)
    return istft(xp, mag * angles, n_fft=n_fft, hop=hop, window=window)


def spectral_convergence(xp: Any, target: Any, estimate: Any) -> float:
    """``||target - estimate||_F / ||target||_F`` of two magnitude spectrograms."""
    num = xp.sqrt(xp.sum((target - estimate) ** 2))
    den = xp.sqrt(xp.sum(target**2))
    return float(to_host(num)) / max(float(to_host(den)), 1e-12)


# --------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class TTSConfig:
    n_symbols: int = 64
    d_model: int = 128
    n_conv_layers: int = 3
    kernel_size: int = 5
    frames_per_char: int = 4
    n_mels: int = 80
    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 256
    n_iter: int = 16
    fmin: float = 0.0
    fmax: float | None = None
    init_std: float = 0.3

    def __post_init__(self) -> None:
        for name in ("n_symbols", "d_model", "n_conv_layers", "kernel_size", "frames_per_char",
                     "n_mels", "sample_rate", "n_fft", "hop_length"):  # fmt: skip
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"TTSConfig.{name} must be positive")
        if self.n_symbols < len(SYMBOLS):
            raise ValueError(f"TTSConfig.n_symbols must be >= {len(SYMBOLS)}")
        if self.n_fft % self.hop_length:
            raise ValueError("TTSConfig.n_fft must be a multiple of hop_length")
        if self.n_iter < 0:
            raise ValueError("TTSConfig.n_iter must be >= 0")


class TinyTTS(Model):
    """Text-to-speech with random weights by default.

    ``TinyTTS(config=None, *, xp=numpy, seed=0)``. Text → :func:`text_to_ids` → symbol
    embedding, repeated ``frames_per_char`` times with a learned within-symbol position →
    ``n_conv_layers`` residual blocks (LayerNorm, 1-D conv, GELU) → a linear layer to
    ``n_mels`` log-mel values squashed to ``[-8, 0]`` → mel magnitudes → linear magnitudes
    through the filterbank's pseudo-inverse → Griffin-Lim.
    """

    config_cls = TTSConfig
    config: TTSConfig

    def __init__(self, config: TTSConfig | None = None, *, xp: Any = np, seed: int = 0) -> None:
        super().__init__(config, xp=xp, seed=seed)
        c = self.config
        fb = mel_filterbank(c.sample_rate, c.n_fft, c.n_mels, c.fmin, c.fmax)
        self.mel_basis = xp.array(fb, dtype=xp.float32)  # (n_mels, n_freq)
        self.mel_pinv = xp.array(np.linalg.pinv(fb).astype(np.float32), dtype=xp.float32)
        self.window = hann_window(xp, c.n_fft)

    @property
    def buffers_nbytes(self) -> int:
        """Bytes of the fixed buffers (filterbank, its pseudo-inverse, window)."""
        return sum(int(a.nbytes) for a in (self.mel_basis, self.mel_pinv, self.window))

    def param_specs(self) -> dict[str, ParamSpec]:
        c = self.config
        d = c.d_model
        specs = {
            "emb": ParamSpec((c.n_symbols, d), c.init_std),
            "frame_pos": ParamSpec((c.frames_per_char, d), c.init_std),
        }
        for i in range(c.n_conv_layers):
            specs[f"conv.{i}.ln.g"] = ParamSpec((d,), "ones")
            specs[f"conv.{i}.ln.b"] = ParamSpec((d,), "zeros")
            specs[f"conv.{i}.w"] = ParamSpec(
                (c.kernel_size * d, d), 1 / math.sqrt(c.kernel_size * d)
            )
            specs[f"conv.{i}.b"] = ParamSpec((d,), "zeros")
        specs["out.w"] = ParamSpec((d, c.n_mels), 1 / math.sqrt(d))
        specs["out.b"] = ParamSpec((c.n_mels,), "zeros")
        return specs

    def n_frames(self, text: str) -> int:
        return len(text_to_ids(text)) * self.config.frames_per_char

    def mel(self, text: str) -> Any:
        """Mel magnitude spectrogram ``(frames, n_mels)`` float32 in ``[e^-8, 1]``;
        ``frames = frames_per_char * len(text_to_ids(text))`` (0 for text with no symbols)."""
        xp, c, p = self.xp, self.config, self.params
        ids = text_to_ids(text)
        if not ids:
            return xp.zeros((0, c.n_mels), dtype=xp.float32)
        idx = xp.asarray(np.repeat(np.asarray(ids, dtype=np.int64), c.frames_per_char))
        n = len(ids) * c.frames_per_char
        pos = xp.concatenate([p["frame_pos"]] * len(ids), axis=0)
        x = xp.take(p["emb"], idx, axis=0) + pos[:n]
        for i in range(c.n_conv_layers):
            h = layer_norm(xp, x, p[f"conv.{i}.ln.g"], p[f"conv.{i}.ln.b"])
            x = x + gelu(xp, conv1d_same(xp, h, p[f"conv.{i}.w"], p[f"conv.{i}.b"], c.kernel_size))
        log_mel = 4.0 * xp.tanh(x @ p["out.w"] + p["out.b"]) - 4.0
        return xp.exp(log_mel).astype(xp.float32)

    def mel_to_linear(self, mel: Any) -> Any:
        """Linear magnitudes ``(frames, n_fft // 2 + 1)``: ``mel @ pinv(filterbank).T``,
        clipped at 0."""
        xp = self.xp
        lin = xp.asarray(mel, dtype=xp.float32) @ self.mel_pinv.T
        return xp.maximum(lin, 0.0).astype(xp.float32)

    def linear_to_mel(self, linear: Any) -> Any:
        """Mel magnitudes of linear magnitudes (``linear @ filterbank.T``)."""
        return self.xp.asarray(linear, dtype=self.xp.float32) @ self.mel_basis.T

    def vocode(self, mel: Any, *, n_iter: int | None = None, seed: int = 0) -> Any:
        """Waveform of a mel spectrogram via Griffin-Lim; float32, peak-normalised to 0.95."""
        xp, c = self.xp, self.config
        if int(mel.shape[0]) == 0:
            return xp.zeros((0,), dtype=xp.float32)
        y = griffin_lim(
            xp,
            self.mel_to_linear(mel),
            n_fft=c.n_fft,
            hop=c.hop_length,
            n_iter=c.n_iter if n_iter is None else n_iter,
            seed=seed,
            window=self.window,
        )
        peak = float(to_host(xp.max(xp.abs(y)))) if y.shape[0] else 0.0
        if peak > 0.0:
            y = y * (0.95 / peak)
        return xp.clip(y, -1.0, 1.0).astype(xp.float32)

    def synthesize(self, text: str, *, n_iter: int | None = None, seed: int = 0) -> Any:
        """Float32 waveform in ``[-1, 1]`` at ``sample_rate`` Hz,
        ``(frames - 1) * hop_length`` samples for ``frames = len(mel(text))``."""
        return self.vocode(self.mel(text), n_iter=n_iter, seed=seed)
