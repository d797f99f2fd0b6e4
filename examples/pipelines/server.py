"""A FastAPI server for the example pipelines (models with random weights).

    pip install '.[server]'                     # from a checkout; or 'pygpukit-async[server]'
    python examples/pipelines/server.py         # http://127.0.0.1:8000, --help for options
    uvicorn --app-dir examples/pipelines server:app --port 8000   # the same app, by uvicorn

- ``POST /assistant/{service}`` — ``service`` is ``interactive`` (Guaranteed contexts),
  ``standard`` (Burstable) or ``batch`` (BestEffort); body
  ``{"prompt": ..., "max_new_tokens": ...}``; returns the sentences, the seconds of audio
  and the per-stage timings.
- ``POST /assistant/{service}/stream`` — the same, streamed as JSON lines: one line per
  sentence as soon as its audio is ready (16-bit PCM, base64).
- ``POST /describe`` — the seed's LLM + vision → TTS pipeline.
- ``GET /usage`` — every context's memory and task counters.
- ``GET /admission`` — each pipeline's admission: its limit, running, waiting, refused.
- ``GET /metrics`` — Prometheus metrics of the contexts, pipelines and admissions
  (``pygpukit top 127.0.0.1:8000`` shows them live).
- ``GET /health`` — 200 ``{"status": "ok", ...}`` while the runtime is usable; 503
  ``{"status": "unhealthy", ...}`` once the GPU faulted (the process must be restarted: point
  a liveness probe here), while shutting down, or before startup.

Each pipeline admits as many requests at once as it serves within their timeout; the excess
waits, or is refused at once (429 with ``Retry-After``) when it could not finish in time.
A full queue answers 429 too, an expired deadline 504, memory exhaustion 503, a faulted GPU
503 ``CudaError`` without ``Retry-After`` (restart the process), a malformed request 422;
every error body is ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import time
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel

from pygpukit.examples import Audio, Prompt, build_assistant, build_describe
from pygpukit.integrations.fastapi import AdmissionConfig, Pygpukit, ndjson
from pygpukit.pipeline import PipelineResult
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
    #: per stage, (start, end) in ms since the run began; null for a stage that never ran
    timings_ms: dict[str, tuple[float, float] | None]


class AudioChunk(BaseModel):
    text: str
    sample_rate: int
    pcm16_b64: str


def _timings_ms(result: PipelineResult) -> dict[str, tuple[float, float] | None]:
    # a stage that never ran (TTS when the LLM said no sentence) has no times
    return {
        stage_id: None if t.start is None or t.end is None else (t.start * 1e3, t.end * 1e3)
        for stage_id, t in result.timings.items()
    }


def _chunk(audio: Audio) -> AudioChunk:
    samples = audio.samples.get() if hasattr(audio.samples, "get") else audio.samples
    pcm = (np.clip(np.asarray(samples), -1, 1) * 32767).astype("<i2")
    return AudioChunk(
        text=audio.text, sample_rate=audio.sample_rate, pcm16_b64=base64.b64encode(pcm).decode()
    )


def create_app(
    *,
    backend: str = "auto",
    dispatcher: DispatcherConfig | None = None,
    timeout_s: float = 30.0,
    admission: AdmissionConfig | None = AdmissionConfig(),
    models: str = "tiny",
    weights: str | None = None,
) -> FastAPI:
    """The app.

    :param dispatcher: overrides the runtime's caps and queue bounds
    :param models: ``tiny`` (pygpukit's CuPy models) or ``hf`` (Hugging Face transformers
        models on PyTorch: GPT-2, VITS, ViT; needs torch and transformers)
    :param weights: with ``hf``, a directory of checkpoints (``save_hf_weights``) loaded with
        ``local_files_only=True``; random weights without it
    :param timeout_s: each request's deadline, from when its route starts
    :param admission: how much of each pipeline runs at once (``None``: all of it)
    """

    def setup(rt: Runtime) -> dict[str, Any]:
        if dispatcher is not None:
            assert isinstance(rt.policy, Dispatcher)  # the runtime's default policy
            rt.policy.config = dispatcher
        if models == "hf":
            from pygpukit.examples_hf import build_hf_assistant, build_hf_describe

            pipes: dict[str, Any] = {
                s: build_hf_assistant(rt, s, tier, weights=weights) for s, tier in SERVICES.items()
            }
            pipes["describe"] = build_hf_describe(rt, weights=weights)
            return pipes
        pipes = {s: build_assistant(rt, s, tier) for s, tier in SERVICES.items()}
        pipes["describe"] = build_describe(rt)
        return pipes

    gpu = Pygpukit(setup, backend=backend, admission=admission)
    app = FastAPI(title="pygpukit example pipelines", lifespan=gpu.lifespan)
    gpu.install(app)

    async def assistant(service: str) -> Any:  # async: a plain one would run on a thread
        if service not in SERVICES:
            raise HTTPException(404, f"unknown service {service!r}; use one of {list(SERVICES)}")
        return gpu.get_pipeline(service)

    @app.post("/assistant/{service}")
    async def ask(req: Prompt, pipeline: Any = Depends(assistant)) -> Reply:
        result = await pipeline.run(req, deadline=time.monotonic() + timeout_s)
        return Reply(
            sentences=[a.text for a in result.output],
            audio_seconds=sum(len(a.samples) / a.sample_rate for a in result.output),
            first_audio_ms=(result.first_output_s or 0.0) * 1e3,
            timings_ms=_timings_ms(result),
        )

    @app.post("/assistant/{service}/stream")
    async def ask_streaming(req: Prompt, pipeline: Any = Depends(assistant)) -> Any:
        # admitted before the response starts: a refusal is a 429, not an error line
        items = await pipeline.stream(req, deadline=time.monotonic() + timeout_s).admit()

        async def chunks() -> Any:
            async with items:
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
            timings_ms=_timings_ms(result),
        )

    @app.get("/usage")
    async def usage() -> dict[str, Any]:
        return {ctx.name: ctx.usage().__dict__ for ctx in gpu.runtime.contexts}

    @app.get("/admission")
    async def admission_state() -> dict[str, Any]:
        return {name: dataclasses.asdict(a.statistics()) for name, a in gpu.admissions.items()}

    return app


app = create_app()

if __name__ == "__main__":
    import uvicorn

    p = argparse.ArgumentParser(description="Serve the example pipelines over HTTP.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", default="auto", help="auto, cuda or host")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds a request may take")
    p.add_argument(
        "--models",
        default="tiny",
        choices=("tiny", "hf"),
        help="tiny: pygpukit's CuPy models; hf: Hugging Face transformers models on PyTorch",
    )
    p.add_argument("--weights", help="with --models hf: checkpoints saved by save_hf_weights")
    a = p.parse_args()
    uvicorn.run(
        create_app(backend=a.backend, timeout_s=a.timeout, models=a.models, weights=a.weights),
        host=a.host,
        port=a.port,
        log_level="warning",
    )
