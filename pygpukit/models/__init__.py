"""Three small, real models for the example pipelines (random weights by default).

- :class:`TinyLM` — byte-level decoder-only transformer with a KV cache (text generation).
- :class:`TinyViT` — vision transformer: image embedding and a deterministic caption.
- :class:`TinyTTS` — text → mel spectrogram → waveform with Griffin-Lim.

Each is written once against an array namespace passed as ``xp`` (``numpy``, ``cupy`` or
``pygpukit.xp``): ``Model(config=None, *, xp=numpy, seed=0)``. Weights are allocated through
``xp``, so inside a pygpukit ``context_session`` they are charged to that context.
"""

from .layers import Model
from .lm import BOS, EOS, VOCAB_SIZE, KVCache, LMConfig, TinyLM
from .tts import TinyTTS, TTSConfig, griffin_lim, mel_filterbank, spectral_convergence
from .vision import TinyViT, ViTConfig

__all__ = (
    "BOS",
    "EOS",
    "VOCAB_SIZE",
    "KVCache",
    "LMConfig",
    "Model",
    "TTSConfig",
    "TinyLM",
    "TinyTTS",
    "TinyViT",
    "ViTConfig",
    "griffin_lim",
    "mel_filterbank",
    "spectral_convergence",
)
