"""A FastAPI server for the example pipelines (models with random weights).

    pip install 'pygpukit[server]'
    uvicorn --app-dir examples/pipelines server:app --port 8000

- ``POST /assistant/{service}`` — ``service`` is ``interactive`` (Guaranteed contexts),
  ``standard`` (Burstable) or ``batch`` (BestEffort); body
  ``{"prompt": ..., "max_new_tokens": ...}``; returns the sentences, the seconds of audio
  and the per-stage timings.
- ``POST /assistant/{service}/stream`` — the same, streamed as JSON lines: one line per
  sentence as soon as its audio is ready (16-bit PCM, base64).
- ``POST /describe`` — the seed's LLM + vision → TTS pipeline.
- ``GET /usage`` — every context's memory and task counters.

Overload answers 429 (queue full), an expired deadline 504, memory exhaustion 503.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel

from pygpukit.examples import Audio, Prompt, build_assistant, build_describe
from pygpukit.integrations.fastapi import Pygpukit, ndjson
from pygpukit.runtime import Dispatcher, DispatcherConfig, QoSPolicy, Runtime

SERVICES = {
    "interactive": QoSPolicy.GUARANTEED,
    "standard": QoSPolicy.BURSTABLE,
    "batch": QoSPolicy.BEST_EFFORT,
}


class Reply(BaseModel):
    sentences: list[str]
    audio_seconds: float
    first_audio_ms: float
    timings_ms: dict[str, tuple[float, float]]


class AudioChunk(BaseModel):
    text: str
    sample_rate: int
    pcm16_b64: str


def _chunk(audio: Audio) -> AudioChunk:
    samples = audio.samples.get() if hasattr(audio.samples, "get") else audio.samples
    pcm = (np.clip(np.asarray(samples), -1, 1) * 32767).astype("<i2")
    return AudioChunk(
        text=audio.text, sample_rate=audio.sample_rate, pcm16_b64=base64.b64encode(pcm).decode()
    )


def create_app(
    *, backend: str = "auto", dispatcher: DispatcherConfig | None = None, timeout_s: float = 30.0
) -> FastAPI:
    """The app; ``dispatcher`` overrides the runtime's caps and queue bounds."""

    def setup(rt: Runtime) -> dict[str, Any]:
        if dispatcher is not None:
            assert isinstance(rt.policy, Dispatcher)  # the runtime's default policy
            rt.policy.config = dispatcher
        pipes: dict[str, Any] = {s: build_assistant(rt, s, tier) for s, tier in SERVICES.items()}
        pipes["describe"] = build_describe(rt)
        return pipes

    gpu = Pygpukit(setup, backend=backend)
    app = FastAPI(title="pygpukit example pipelines", lifespan=gpu.lifespan)
    gpu.install(app)

    def assistant(service: str) -> Any:
        if service not in SERVICES:
            raise HTTPException(404, f"unknown service {service!r}; use one of {list(SERVICES)}")
        return gpu.pipelines[service]

    @app.post("/assistant/{service}")
    async def ask(req: Prompt, pipeline: Any = Depends(assistant)) -> Reply:
        result = await pipeline.run(req, deadline=time.monotonic() + timeout_s)
        return Reply(
            sentences=[a.text for a in result.output],
            audio_seconds=sum(len(a.samples) / a.sample_rate for a in result.output),
            first_audio_ms=(result.first_output_s or 0.0) * 1e3,
            timings_ms={k: (t.start * 1e3, t.end * 1e3) for k, t in result.timings.items()},
        )

    @app.post("/assistant/{service}/stream")
    async def ask_streaming(req: Prompt, pipeline: Any = Depends(assistant)) -> Any:
        async def chunks() -> Any:
            async with pipeline.stream(req, deadline=time.monotonic() + timeout_s) as items:
                async for audio in items:
                    yield _chunk(audio)

        return ndjson(chunks())

    @app.post("/describe")
    async def describe(req: Prompt, pipeline: Any = Depends(gpu.pipeline("describe"))) -> Reply:
        result = await pipeline.run(
            {"prompt": req.prompt, "max_new_tokens": req.max_new_tokens},
            deadline=time.monotonic() + timeout_s,
        )
        audio = result.output
        return Reply(
            sentences=[audio.text],
            audio_seconds=len(audio.samples) / audio.sample_rate,
            first_audio_ms=(result.first_output_s or 0.0) * 1e3,
            timings_ms={k: (t.start * 1e3, t.end * 1e3) for k, t in result.timings.items()},
        )

    @app.get("/usage")
    async def usage() -> dict[str, Any]:
        return {ctx.name: ctx.usage().__dict__ for ctx in gpu.runtime.contexts}

    return app


app = create_app()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
