"""The example pipelines on Hugging Face transformers models (PyTorch).

The same two pipelines as :mod:`pygpukit.examples` — LLM → TTS streamed sentence by
sentence, and the seed's LLM + vision → TTS — with architectures transformers ships: a
GPT-2 language model, a VITS text-to-speech model and a ViT image encoder, built from small
configs. **Weights are random by default** (real computation, meaningless output);
``weights=DIR`` loads checkpoints saved by :func:`save_hf_weights` (or any compatible ones)
with ``from_pretrained(DIR/<role>, local_files_only=True)``: nothing is downloaded.

Each model is created inside its context's session, so its weights are charged to the
context (on CUDA; on the host backend PyTorch runs on the CPU, uncharged), and every model
call runs through ``ctx.submit`` on the context's launcher thread, where its activations and
KV cache are charged too. Text goes in and out as bytes (ids 4 to 259): there is no tokenizer
to download.

Its stages are registered as ``<service>_hf_llm`` and so on, beside the CuPy examples'
``<service>_llm``. Needs ``pip install torch transformers``; importing this module imports
neither until a builder runs.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .examples import (
    Audio,
    Caption,
    ImageRequest,
    Prompt,
    Sentence,
    describe_contexts,
    describe_graph,
    request_priority,
    tier_context,
)
from .pipeline import Pipeline, stage
from .runtime import ExecutionContext, QoSPolicy, Runtime, context_session

__all__ = ("HFModels", "build_hf_assistant", "build_hf_describe", "save_hf_weights")

_OFFSET = 4  # ids 0-3 are special; byte b is id b + 4
_VOCAB = 256 + _OFFSET
_CHUNK = 12  # tokens per streamed sentence when the text has no full stop (random weights)
_WORDS = ("a", "cat", "sky", "road", "tree", "light", "city", "face", "sea", "book")


@dataclass(frozen=True)
class HFModels:
    """The three models' config arguments (transformers' ``GPT2Config``, ``VitsConfig``,
    ``ViTConfig``); :meth:`small` keeps a CPU run of the examples to seconds."""

    lm: dict[str, Any] = field(default_factory=dict)
    tts: dict[str, Any] = field(default_factory=dict)
    vit: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def small(cls) -> HFModels:
        return cls(
            lm={
                "vocab_size": _VOCAB, "n_positions": 1024, "n_embd": 256, "n_layer": 4, "n_head": 4,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            },
            tts={
                "vocab_size": _VOCAB, "hidden_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 2, "ffn_dim": 192, "flow_size": 96,
                "spectrogram_bins": 129, "upsample_initial_channel": 128,
                "upsample_rates": [8, 8, 2, 2], "upsample_kernel_sizes": [16, 16, 4, 4],
                "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3, 5]],
                "prior_encoder_num_flows": 2, "posterior_encoder_num_wavenet_layers": 2,
                "prior_encoder_num_wavenet_layers": 2, "duration_predictor_num_flows": 2,
                "duration_predictor_filter_channels": 96, "depth_separable_num_layers": 2,
            },
            vit={
                "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 256, "image_size": 64, "patch_size": 16,
            },
        )  # fmt: skip


def _device(rt: Runtime) -> str:
    return f"cuda:{rt.device.device_id}" if rt.backend.name == "cuda" else "cpu"


def _make(role: str, models: HFModels, weights: str | Path | None, seed: int) -> Any:
    import torch
    import transformers as tf

    cls: Any
    config: Any
    cls, config = {
        "lm": (tf.GPT2LMHeadModel, tf.GPT2Config),
        "tts": (tf.VitsModel, tf.VitsConfig),
        "vit": (tf.ViTModel, tf.ViTConfig),
    }[role]
    if weights is not None:
        return cls.from_pretrained(Path(weights) / role, local_files_only=True).eval()
    torch.manual_seed(seed)
    return cls(config(**getattr(models, role))).eval()


def save_hf_weights(directory: str | Path, models: HFModels | None = None) -> None:
    """Write the three models' (random) weights in ``directory``/lm, /tts, /vit, as
    ``save_pretrained`` does; the builders load them back with ``weights=directory``."""
    models = models or HFModels.small()
    for seed, role in enumerate(("lm", "tts", "vit"), start=1):
        _make(role, models, None, seed).save_pretrained(Path(directory) / role)


def _load(
    rt: Runtime,
    ctx: ExecutionContext,
    role: str,
    models: HFModels,
    weights: str | Path | None,
    seed: int,
) -> Any:
    """The model, built on the CPU and moved to the device in ``ctx``'s session: its
    weights are charged to ``ctx``."""
    model = _make(role, models, weights, seed)
    with context_session(ctx):
        return model.to(_device(rt))


def _ids(text: str, device: str) -> Any:
    import torch

    data = text.encode()[:512] or b" "
    return torch.tensor([[b + _OFFSET for b in data]], device=device)


def _text(ids: Any) -> str:
    data = bytes(max(0, int(i) - _OFFSET) for i in ids)
    return data.decode("utf-8", errors="replace")


class _Decoder:
    """Sentences of one request, decoded in chunks: each :meth:`next` call continues the
    same KV cache (sampling from PyTorch's generator: random weights decode greedily into
    one repeated byte)."""

    def __init__(self, lm: Any, prompt: str, max_new_tokens: int) -> None:
        self.lm = lm
        self.device = next(lm.parameters()).device
        self.ids = _ids(prompt, str(self.device))
        self.prompt_len = self.ids.shape[1]
        self.left = max_new_tokens
        self.cache: Any = None

    def next(self) -> str | None:
        import torch

        if self.left <= 0:
            return None
        n = min(_CHUNK, self.left)
        with torch.inference_mode():
            out = self.lm.generate(
                self.ids,
                attention_mask=torch.ones_like(self.ids),
                **{_cache_name(): self.cache},
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=True,
                top_k=0,
                return_dict_in_generate=True,
            )
        new = out.sequences[0, self.ids.shape[1] :]
        self.ids, self.cache = out.sequences, getattr(out, _cache_name())
        self.left -= n
        return _text(new.tolist())


@functools.cache  # asked at every decode chunk; the installed transformers does not change
def _cache_name() -> str:
    """What transformers calls the KV cache generate() continues from and returns:
    ``cache`` in 5.x releases that renamed it, ``past_key_values`` before."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    fields = getattr(GenerateDecoderOnlyOutput, "__dataclass_fields__", {})
    return "cache" if "cache" in fields else "past_key_values"


def _generate(lm: Any, prompt: str, max_new_tokens: int) -> Iterator[str]:
    decoder = _Decoder(lm, prompt, max_new_tokens)
    while (sentence := decoder.next()) is not None:
        yield sentence


def _speak(tts: Any, text: str) -> Any:
    import torch

    device = next(tts.parameters()).device
    ids = _ids(text, str(device))
    with torch.inference_mode():
        wave = tts(ids, attention_mask=torch.ones_like(ids)).waveform[0]
    return wave.float().cpu().numpy()


def _caption(vit: Any, seed: int, image_size: int) -> str:
    import torch

    device = next(vit.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    image = torch.rand(1, 3, image_size, image_size, device=device, generator=generator)
    with torch.inference_mode():
        pooled = vit(pixel_values=image).pooler_output[0]
    picks = pooled.topk(3).indices.tolist()
    return " ".join(_WORDS[i % len(_WORDS)] for i in picks)


def build_hf_assistant(
    rt: Runtime,
    service: str,
    tier: QoSPolicy,
    *,
    models: HFModels | None = None,
    max_vram: int = 512 << 20,
    weights: str | Path | None = None,
) -> Pipeline:
    """Contexts ``<service>-llm`` and ``<service>-tts`` of ``tier`` with a GPT-2 and a VITS
    model (random, or from ``weights``), and the streaming pipeline ``<service>``:
    Prompt → Sentence* → Audio*."""
    models = models or HFModels.small()
    llm_ctx = tier_context(rt, f"{service}-llm", tier, max_vram)
    tts_ctx = tier_context(rt, f"{service}-tts", tier, max_vram)
    lm = _load(rt, llm_ctx, "lm", models, weights, 1)
    tts = _load(rt, tts_ctx, "tts", models, weights, 2)
    rate = int(tts.config.sampling_rate)

    @stage(f"{service}_hf_llm", context=llm_ctx)
    async def generate(inp: Prompt) -> AsyncIterator[Sentence]:
        decoder = _Decoder(lm, inp.prompt, inp.max_new_tokens)
        while True:  # one launcher task per sentence: the loop stays free meanwhile
            text = await llm_ctx.submit(decoder.next, priority=request_priority())
            if text is None:
                return
            yield Sentence(text=text)

    @stage(f"{service}_hf_tts", context=tts_ctx)
    async def speak(inp: Sentence) -> Audio:
        samples = await tts_ctx.submit(_speak, tts, inp.text, priority=request_priority())
        return Audio(text=inp.text, samples=samples, sample_rate=rate)

    return Pipeline.chain(service, generate, speak, runtime=rt).build()


def build_hf_describe(
    rt: Runtime,
    service: str = "describe",
    *,
    models: HFModels | None = None,
    weights: str | Path | None = None,
) -> Pipeline:
    """The seed's example on transformers models: GPT-2 and ViT in parallel, then VITS on
    the combined text."""
    models = models or HFModels.small()
    ctxs = describe_contexts(rt, service, 512 << 20)
    lm = _load(rt, ctxs["llm"], "lm", models, weights, 1)
    vit = _load(rt, ctxs["vision"], "vit", models, weights, 3)
    tts = _load(rt, ctxs["tts"], "tts", models, weights, 2)
    rate = int(tts.config.sampling_rate)
    image_size = int(vit.config.image_size)

    def respond_text(prompt: str, n: int) -> str:
        return "".join(_generate(lm, prompt, n))

    @stage(f"{service}_hf_llm", context=ctxs["llm"])
    async def respond(inp: Prompt) -> Sentence:
        text = await ctxs["llm"].submit(respond_text, inp.prompt, inp.max_new_tokens)
        return Sentence(text=text)

    @stage(f"{service}_hf_vision", context=ctxs["vision"])
    async def look(inp: ImageRequest) -> Caption:
        return Caption(caption=await ctxs["vision"].submit(_caption, vit, inp.seed, image_size))

    @stage(f"{service}_hf_tts", context=ctxs["tts"])
    async def speak(inp: Sentence) -> Audio:
        samples = await ctxs["tts"].submit(_speak, tts, inp.text)
        return Audio(text=inp.text, samples=samples, sample_rate=rate)

    return describe_graph(rt, service, respond, look, speak, combine_name=f"{service}_hf_combine")
