"""Benchmark 9: framework overhead per pipeline stage.

A chain of four stages (each bound to its own context, each doing nothing but build its
output model) run through ``Pipeline.run``, against the same stage functions awaited one
after another inside the same context sessions. The difference over four is the overhead
per stage: graph driving, request propagation, the task group, timings.

    pygpukit bench --only stages          (or: python -m pygpukit.benchmarks.stages)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic import BaseModel

from ..pipeline import Pipeline, registry, stage
from ..runtime import Runtime, context_session
from ._common import Row, bench_main, pct

STAGES = 4

#: What bounds a miss (``pygpukit bench --report`` prints it under the table).
BOUNDS = (
    "A sequential chain runs in the caller's task: per stage it pays the context session's "
    "entry and exit, the request's propagation and the stage's timing. Graphs that fan out, "
    "fan in or stream run under a supervisor task with a task group and a result channel, "
    "whose tasks and loop iterations cost more per stage."
)


class Msg(BaseModel):
    text: str
    hops: int = 0


async def _run(backend: str, n: int) -> dict[str, Any]:
    with Runtime(backend=backend) as rt:
        ctxs = [rt.create_context(f"stage{i}", max_vram=16 << 20) for i in range(STAGES)]
        fns = []
        for i, ctx in enumerate(ctxs):

            async def hop(inp: Msg) -> Msg:
                return Msg(text=inp.text, hops=inp.hops + 1)

            fns.append(stage(f"bench_hop{i}", context=ctx)(hop))
        pipe = Pipeline.chain("bench_stages", *fns, runtime=rt).build()
        request = {"text": "x", "hops": 0}

        async def direct() -> Msg:
            msg = Msg(**request)
            for s, ctx in zip(fns, ctxs, strict=True):
                async with context_session(ctx):
                    msg = await s.fn(msg)
            return msg

        async def piped() -> Any:
            return (await pipe.run(request)).output

        for _ in range(50):
            await direct()
            await piped()
        samples: dict[str, list[float]] = {"direct": [], "pipeline": []}
        for _ in range(n):
            for name, body in (("direct", direct), ("pipeline", piped)):
                t0 = time.perf_counter()
                out = await body()
                samples[name].append((time.perf_counter() - t0) * 1e6)
                assert out.hops == STAGES
        for s in fns:
            registry.unregister(s.name)
        return {
            "device": rt.device.name,
            "backend": rt.backend.name,
            "stages": STAGES,
            "p50_us": {k: pct(v, 50) for k, v in samples.items()},
            "p99_us": {k: pct(v, 99) for k, v in samples.items()},
        }


def summary(r: dict[str, Any]) -> list[Row]:
    p50 = r["p50_us"]
    per_stage = (p50["pipeline"] - p50["direct"]) / r["stages"]
    return [
        Row(
            "stages",
            "framework overhead per pipeline stage (p50)",
            f"{per_stage:.1f} us",
            f"stages awaited directly: {p50['direct'] / r['stages']:.1f} us each",
            "<=50 us",
            per_stage <= 50 if r["backend"] == "cuda" else None,
            per_stage / (p50["direct"] / r["stages"]) if p50["direct"] else None,
        )
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(
        argv,
        __doc__,
        [
            ("--n", {"type": int, "default": 500}),
        ],
        lambda a: asyncio.run(_run(a.backend, a.n)),
        summary,
    )


if __name__ == "__main__":
    main()
