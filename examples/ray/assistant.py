"""The assistant pipeline on Ray Serve: two tiers, two deployments, GPU shares as budgets.

    pip install '.[ray]'
    python examples/ray/assistant.py            # starts Ray on this machine; --help

Two deployments, each replica on half a GPU (``num_gpus=0.5``), which pygpukit turns into
the replica's memory budget:

- ``Speaker`` holds the TTS model, in a Guaranteed context for the interactive tier and a
  BestEffort one for the batch tier;
- ``Assistant`` holds the LLM the same way, and a pipeline ``LLM → Speaker.speak`` whose TTS
  stage is a method of the other deployment (:func:`remote_stage`): typed like any stage,
  checked when the pipeline is built, and handed each request's tier, priority and
  deadline.

It sends interactive and batch requests at once and prints their latencies and each
replica's share. Without a GPU it declares one logical GPU to Ray and runs on pygpukit's
host backend (models with random weights: real computation, meaningless output).
"""

# No "from __future__ import annotations": Ray ships this module's classes to its workers
# by value, and the stages' annotations must be objects there, not names to look up.
import argparse
import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

from pygpukit.examples import Models, Prompt, Sentence, request_priority, tier_context
from pygpukit.integrations.ray import Replica, RequestMeta, remote_stage, request_meta
from pygpukit.models import TinyLM, TinyTTS
from pygpukit.pipeline import Pipeline, stage
from pygpukit.runtime import QoSPolicy, Runtime, context_session

TIERS = {"interactive": QoSPolicy.GUARANTEED, "batch": QoSPolicy.BEST_EFFORT}
MAX_VRAM = 64 << 20  # each model's budget


class Spoken(BaseModel):
    text: str
    audio_seconds: float


class Speaker(Replica):
    """The TTS model, once per tier, in that tier's context."""

    def setup(self, rt: Runtime) -> None:
        self.tts: dict[str, tuple[Any, Any]] = {}
        for service, tier in TIERS.items():
            ctx = tier_context(rt, f"{service}-tts", tier, MAX_VRAM)
            with context_session(ctx):
                self.tts[tier.name] = (ctx, TinyTTS(Models.small().tts, xp=rt.xp, seed=2))

    async def speak(self, sentence: Sentence, meta: RequestMeta) -> Spoken:
        ctx, tts = self.tts[meta.tier or "BEST_EFFORT"]
        samples = await ctx.submit(
            tts.synthesize, sentence.text, priority=meta.priority, deadline=meta.deadline()
        )
        return Spoken(text=sentence.text, audio_seconds=len(samples) / tts.config.sample_rate)


class Assistant(Replica):
    """The LLM, once per tier, and one pipeline per tier whose TTS stage is ``Speaker``'s."""

    def __init__(self, speaker: Any) -> None:
        self.speaker = speaker  # a DeploymentHandle: Assistant.bind(Speaker.bind())
        super().__init__()

    def setup(self, rt: Runtime) -> dict[str, Pipeline]:
        speak = remote_stage(
            "ray_speak", lambda s, meta: self.speaker.speak.remote(s, meta), Sentence, Spoken
        )
        pipelines = {}
        for service, tier in TIERS.items():
            ctx = tier_context(rt, f"{service}-llm", tier, MAX_VRAM)
            with context_session(ctx):
                lm = TinyLM(Models.small().lm, xp=rt.xp, seed=1)
            pipelines[service] = Pipeline.chain(
                service, _generate(f"ray_{service}_llm", ctx, lm), speak, runtime=rt
            ).build()
        return pipelines

    async def ask(self, prompt: Prompt, meta: RequestMeta) -> list[Spoken]:
        service = "interactive" if meta.tier == "GUARANTEED" else "batch"
        return await self.run(service, prompt, meta)  # type: ignore[no-any-return]


def _generate(name: str, ctx: Any, lm: TinyLM) -> Any:
    @stage(name, context=ctx)
    async def generate(inp: Prompt) -> AsyncIterator[Sentence]:
        priority = request_priority()
        sentences = lm.sentences(inp.prompt, inp.max_new_tokens, temperature=1.0, seed=7)
        while (text := await ctx.submit(next, sentences, None, priority=priority)) is not None:
            yield Sentence(text=text)

    return generate


async def _send(handle: Any, requests: int, tokens: int) -> dict[str, list[float]]:
    latency: dict[str, list[float]] = {service: [] for service in TIERS}

    async def one(service: str, i: int) -> None:
        meta = request_meta(tier=TIERS[service], deadline=time.monotonic() + 60)
        start = time.perf_counter()
        spoken = await handle.ask.remote(
            Prompt(prompt=f"Request {i}.", max_new_tokens=tokens), meta
        )
        latency[service].append(time.perf_counter() - start)
        if not spoken or any(s.audio_seconds <= 0 for s in spoken):
            raise RuntimeError(f"{service} request {i} came back without audio: {spoken}")

    order = [("batch", i) for i in range(requests)] + [("interactive", i) for i in range(requests)]
    await asyncio.gather(*(one(s, i) for s, i in order))
    return latency


def main() -> None:
    import ray
    from ray import serve

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=4, help="requests per tier")
    p.add_argument("--tokens", type=int, default=16, help="tokens generated per request")
    p.add_argument("--replicas", type=int, default=1, help="replicas of each deployment")
    a = p.parse_args()
    gpus = None if os.environ.get("PYGPUKIT_BACKEND") == "host" else _visible_gpus()
    # no GPU: one logical GPU for Ray to share out, and pygpukit's host backend
    ray.init(num_cpus=2, num_gpus=gpus or 1, include_dashboard=False, log_to_driver=False)
    env = {} if gpus else {"env_vars": {"PYGPUKIT_BACKEND": "host", "PYGPUKIT_HOST_VRAM": "1GiB"}}
    # every replica of both deployments on one GPU: half of it for each deployment's
    options = {"num_gpus": 0.5 / a.replicas, "num_cpus": 0, "runtime_env": env}
    speaker = serve.deployment(Speaker, ray_actor_options=options, num_replicas=a.replicas)
    assistant = serve.deployment(
        Assistant, ray_actor_options=options, num_replicas=a.replicas, max_ongoing_requests=64
    )
    try:
        handle = serve.run(assistant.bind(speaker.bind()), name="assistant", route_prefix=None)
        start = time.perf_counter()
        latency = asyncio.run(_send(handle, a.requests, a.tokens))
        wall = time.perf_counter() - start
        print(f"{2 * a.requests} requests in {wall:.2f} s on {a.replicas} replica(s) of each")
        for service, xs in latency.items():
            p50, worst = statistics.median(xs) * 1e3, max(xs) * 1e3
            tier = TIERS[service].name
            print(f"{service:<12} ({tier:<11}) p50 {p50:8.1f} ms  max {worst:8.1f} ms")
        share = handle.vram_limit.remote().result()
        print(f"each replica manages {share / 2**20:.0f} MiB: its share of the GPU")
    finally:
        serve.shutdown()
        ray.shutdown()


def _visible_gpus() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


if __name__ == "__main__":
    main()
