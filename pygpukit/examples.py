"""The example pipelines, shared by ``examples/pipelines/``, the FastAPI example and
``pygpukit demo``.

- :func:`build_assistant` — LLM → TTS, streamed sentence by sentence: the TTS stage speaks
  each sentence as soon as the LLM has produced it, so the first audio arrives before the
  last token.
- :func:`build_describe` — the seed's example: LLM and vision in parallel, then TTS on the
  combined text.

The models are :mod:`pygpukit.models` with **random weights** (real computation, meaningless
output), created inside their contexts' sessions so their memory is charged there. Every
model call runs through ``ctx.submit`` on the context's launcher thread, with the request's
priority.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from .models import LMConfig, TinyLM, TinyTTS, TinyViT, TTSConfig, ViTConfig
from .pipeline import Array, Pipeline, current_request, stage
from .runtime import ExecutionContext, QoSPolicy, Runtime, context_session

__all__ = (
    "Audio",
    "Description",
    "ImageRequest",
    "Models",
    "Prompt",
    "Sentence",
    "build_assistant",
    "build_describe",
    "describe_contexts",
    "describe_graph",
    "request_priority",
    "save_assistant_weights",
    "tier_context",
)


class Prompt(BaseModel):
    prompt: str = Field(min_length=1, max_length=4096)
    max_new_tokens: int = Field(48, ge=1, le=1024)


class Sentence(BaseModel):
    text: str


if TYPE_CHECKING:
    Samples = Any
else:
    Samples = Array["float32", (None,)]  # a mono waveform of any length


class Audio(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    text: str
    samples: Samples
    sample_rate: int


class ImageRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=4096)
    seed: int = 0
    max_new_tokens: int = Field(32, ge=1, le=1024)


class Caption(BaseModel):
    caption: str


class Description(BaseModel):
    text: str


@dataclass(frozen=True)
class Models:
    """Model sizes; ``small`` keeps the demo well under a minute on two CPU cores."""

    lm: LMConfig
    tts: TTSConfig
    vit: ViTConfig

    @classmethod
    def small(cls) -> Models:
        return cls(LMConfig(), TTSConfig(n_iter=8), ViTConfig())

    @classmethod
    def large(cls) -> Models:
        return cls(
            LMConfig(d_model=512, n_layers=6, n_heads=8, d_ff=2048, max_len=512),
            TTSConfig(d_model=256, n_iter=32),
            ViTConfig(d_model=384, n_layers=6, n_heads=6, d_ff=1536),
        )


def request_priority() -> int:
    """The priority of the request the calling stage serves (0 outside a pipeline): what
    its ``ctx.submit`` calls pass on."""
    request = current_request()
    return 0 if request is None else request.priority


def describe_contexts(rt: Runtime, service: str, max_vram: int) -> dict[str, ExecutionContext]:
    """The describe pipeline's contexts: ``<service>-llm`` Guaranteed, ``-vision`` and
    ``-tts`` Burstable, each of ``max_vram``."""
    return {
        role: tier_context(rt, f"{service}-{role}", tier, max_vram)
        for role, tier in (
            ("llm", QoSPolicy.GUARANTEED),
            ("vision", QoSPolicy.BURSTABLE),
            ("tts", QoSPolicy.BURSTABLE),
        )
    }


def tier_context(rt: Runtime, name: str, tier: QoSPolicy, max_vram: int) -> ExecutionContext:
    """A context of ``tier``; a Burstable one has half its budget as its base."""
    base = max_vram // 2 if tier is QoSPolicy.BURSTABLE else None
    return rt.create_context(name, max_vram=max_vram, base_vram=base, qos=tier)


def save_assistant_weights(directory: str | Path, models: Models | None = None) -> None:
    """Write the assistant's (random) weights as ``lm.npz`` and ``tts.npz`` in ``directory``;
    :func:`build_assistant` loads them back with ``weights=directory``."""
    models = models or Models.small()
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    TinyLM(models.lm, seed=1).save(path / "lm.npz")
    TinyTTS(models.tts, seed=2).save(path / "tts.npz")


def build_assistant(
    rt: Runtime,
    service: str,
    tier: QoSPolicy,
    *,
    models: Models | None = None,
    max_vram: int = 256 << 20,
    weights: str | Path | None = None,
) -> Pipeline:
    """Contexts ``<service>-llm`` and ``<service>-tts`` of ``tier``, their models (random,
    or loaded from ``weights``/lm.npz and tts.npz), and the streaming pipeline
    ``<service>``: Prompt → Sentence* → Audio*."""
    models = models or Models.small()
    llm_ctx = tier_context(rt, f"{service}-llm", tier, max_vram)
    tts_ctx = tier_context(rt, f"{service}-tts", tier, max_vram)
    with context_session(llm_ctx):
        if weights is None:
            lm = TinyLM(models.lm, xp=rt.xp, seed=1)
        else:
            lm = TinyLM.load(Path(weights) / "lm.npz", xp=rt.xp)
    with context_session(tts_ctx):
        if weights is None:
            tts = TinyTTS(models.tts, xp=rt.xp, seed=2)
        else:
            tts = TinyTTS.load(Path(weights) / "tts.npz", xp=rt.xp)

    @stage(f"{service}_llm", context=llm_ctx)
    async def generate(inp: Prompt) -> AsyncIterator[Sentence]:
        # Sampling (not greedy): random weights decode greedily into one repeated byte.
        # graph=True: each decode step is one replayed CUDA graph that samples on the GPU.
        seed = sum(inp.prompt.encode()) % 1000
        sentences = lm.sentences(
            inp.prompt, inp.max_new_tokens, temperature=1.0, seed=seed, graph=True
        )
        while True:  # one launcher task per sentence: the loop stays free meanwhile
            text = await llm_ctx.submit(next, sentences, None, priority=request_priority())
            if text is None:
                return
            yield Sentence(text=text)

    @stage(f"{service}_tts", context=tts_ctx)
    async def speak(inp: Sentence) -> Audio:
        samples = await tts_ctx.submit(tts.synthesize, inp.text, priority=request_priority())
        return Audio(text=inp.text, samples=samples, sample_rate=tts.config.sample_rate)

    return Pipeline.chain(service, generate, speak, runtime=rt).build()


def build_describe(
    rt: Runtime, service: str = "describe", *, models: Models | None = None
) -> Pipeline:
    """The seed's example: LLM and vision in parallel, then TTS on the combined text."""
    models = models or Models.small()
    ctxs = describe_contexts(rt, service, 256 << 20)
    with context_session(ctxs["llm"]):
        lm = TinyLM(models.lm, xp=rt.xp, seed=1)
    with context_session(ctxs["vision"]):
        vit = TinyViT(models.vit, xp=rt.xp, seed=3)
    with context_session(ctxs["tts"]):
        tts = TinyTTS(models.tts, xp=rt.xp, seed=2)

    def _text(prompt: str, n: int) -> str:
        return "".join(lm.sentences(prompt, n, temperature=1.0, seed=len(prompt), graph=True))

    @stage(f"{service}_llm", context=ctxs["llm"])
    async def respond(inp: Prompt) -> Sentence:
        text = await ctxs["llm"].submit(_text, inp.prompt, inp.max_new_tokens)
        return Sentence(text=text)

    @stage(f"{service}_vision", context=ctxs["vision"])
    async def look(inp: ImageRequest) -> Caption:
        def caption(seed: int) -> str:
            return vit.caption(vit.random_image(seed))

        return Caption(caption=await ctxs["vision"].submit(caption, inp.seed))

    @stage(f"{service}_tts", context=ctxs["tts"])
    async def speak(inp: Sentence) -> Audio:
        samples = await ctxs["tts"].submit(tts.synthesize, inp.text)
        return Audio(text=inp.text, samples=samples, sample_rate=models.tts.sample_rate)

    return describe_graph(rt, service, respond, look, speak, combine_name=f"{service}_combine")


class _Combined(BaseModel):
    text: str
    caption: str


def describe_graph(
    rt: Runtime, service: str, respond: Any, look: Any, speak: Any, *, combine_name: str
) -> Pipeline:
    """The seed's graph on three stages: ``respond`` (Prompt → Sentence) and ``look``
    (ImageRequest → Caption) in parallel, their outputs joined into one Sentence by a stage
    named ``combine_name``, then ``speak`` (Sentence → Audio)."""

    @stage(combine_name)
    async def combine(inp: _Combined) -> Sentence:
        return Sentence(text=f"{inp.text}. {inp.caption}")

    request = {f: f"$input.{f}" for f in ("prompt", "max_new_tokens")}
    p = Pipeline(service, runtime=rt)
    p.add(respond, id="llm", inputs=request)
    p.add(look, id="vision", inputs={**request, "seed": "$input.seed"})
    p.add(combine, id="combine", inputs={"text": "llm.text", "caption": "vision.caption"})
    p.add(speak, id="tts", inputs={"text": "combine.text"})
    return p.output("tts").build()


def audio_seconds(result: Any) -> float:
    """Seconds of audio in a pipeline result (one Audio or a list of them)."""
    items = result.output if isinstance(result.output, list) else [result.output]
    return float(sum(len(a.samples) / a.sample_rate for a in items))
