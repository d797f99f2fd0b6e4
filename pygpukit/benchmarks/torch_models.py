"""Benchmark 11: PyTorch models in contexts — four decoding at once, and QoS under a flood.

- **concurrency**: four small GPT-2 models (Hugging Face transformers, random weights),
  batch 1, each decoding ``--tokens`` steps through ``ctx.submit`` in its own context at
  once, against the same four stepped one after another on one stream from one thread.
  Each step is a fixed-window forward pass and a greedy pick on the device (the window
  shifts on the device too); measured eager, and replayed from a graph (``capture_step``).
  Tokens per second.
- **isolation**: a Guaranteed model's step (``--samples`` of them, one at a time) alone and
  while three BestEffort contexts flood the GPU with large matrix products through
  ``submit``; p50 and p99 of the step's latency.

Needs torch and transformers, and CUDA: on the host backend nothing is measured.

    pygpukit bench --only torch_models    (or: python -m pygpukit.benchmarks.torch_models)
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from typing import Any

from ..runtime import QoSPolicy, Runtime, capture_step, context_session
from ._common import Row, bench_main, pct

N_MODELS = 4
WINDOW = 32

#: What bounds a miss (``pygpukit bench --report`` prints it under the table).
BOUNDS = (
    "Eager steps launch every kernel of the model from Python, and four launcher threads "
    "take turns at the GIL to do it: eager concurrency is bounded by one thread's launch "
    "rate. A replayed step is one launch, so the graph rows are bounded by the GPU. The "
    "isolation row is bounded by stream priority: a Guaranteed kernel waits for the "
    "BestEffort blocks already running on the SMs to finish."
)


def _model(seed: int, device: str) -> Any:
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.GPT2Config(
        vocab_size=260, n_positions=WINDOW, n_embd=512, n_layer=4, n_head=8,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model: Any = tf.GPT2LMHeadModel(config)
    return model.eval().to(device)


def _step_fn(model: Any) -> Any:
    import torch

    def step(ids: Any) -> Any:
        with torch.inference_mode():
            logits = model(ids).logits[0, -1]
            nxt = logits.argmax().reshape(1, 1)
            ids.copy_(torch.cat([ids[:, 1:], nxt], dim=1))  # the window moves on the device
        return nxt

    return step


def _measure(backend: str, tokens: int, samples: int) -> dict[str, Any]:
    result: dict[str, Any] = {"measured": False, "tokens": tokens, "models": N_MODELS}
    if (
        importlib.util.find_spec("torch") is None
        or importlib.util.find_spec("transformers") is None
    ):
        return {**result, "why": "torch and transformers are not installed"}
    import torch

    with Runtime(backend=backend) as rt:
        result.update(device=rt.device.name, backend=rt.backend.name)
        if rt.backend.name != "cuda" or not torch.cuda.is_available():
            return {**result, "why": "no CUDA"}
        dev = f"cuda:{rt.device.device_id}"
        ctxs = [
            rt.create_context(f"lm{i}", max_vram=1 << 30, qos=QoSPolicy.BURSTABLE)
            for i in range(N_MODELS)
        ]
        models, steps, graphs, ids = [], [], [], []
        for i, ctx in enumerate(ctxs):
            with context_session(ctx):
                models.append(_model(i, dev))
                steps.append(_step_fn(models[i]))
                ids.append(torch.randint(4, 260, (1, WINDOW), device=dev))
                graphs.append(capture_step(steps[i], ids[i]))

        async def concurrent(use_graph: bool) -> float:
            async def one(i: int) -> None:
                fn = graphs[i] if use_graph else steps[i]
                for _ in range(tokens):
                    await ctxs[i].submit(fn, ids[i])

            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(N_MODELS)))
            return N_MODELS * tokens / (time.perf_counter() - t0)

        def serialized(use_graph: bool) -> float:
            with context_session(ctxs[0]):  # one stream, one thread
                t0 = time.perf_counter()
                for _ in range(tokens):
                    for i in range(N_MODELS):
                        (graphs[i] if use_graph else steps[i])(ids[i])
                torch.cuda.current_stream().synchronize()
                return N_MODELS * tokens / (time.perf_counter() - t0)

        for use_graph in (False, True):  # warm both paths
            asyncio.run(concurrent(use_graph))
            serialized(use_graph)
        for use_graph, key in ((False, "eager"), (True, "graph")):
            result[f"{key}_ours_tps"] = asyncio.run(concurrent(use_graph))
            result[f"{key}_serial_tps"] = serialized(use_graph)
        for g in graphs:
            g.close()
        result.update(_isolation(rt, torch, dev, samples))
        result["measured"] = True
        return result


def _isolation(rt: Runtime, torch: Any, dev: str, samples: int) -> dict[str, Any]:
    g = rt.create_context("interactive", max_vram=1 << 30, qos=QoSPolicy.GUARANTEED)
    floods = [
        rt.create_context(f"flood{i}", max_vram=1 << 30, qos=QoSPolicy.BEST_EFFORT)
        for i in range(3)
    ]
    with context_session(g):
        model = _model(9, dev)
        step = _step_fn(model)
        ids = torch.randint(4, 260, (1, WINDOW), device=dev)
    mats = []
    for f in floods:
        with context_session(f):
            mats.append(torch.randn(4096, 4096, device=dev))

    def flood_work(m: Any) -> None:
        for _ in range(8):
            m @ m  # the work is the point

    async def latencies(flooding: bool) -> list[float]:
        stop = asyncio.Event()

        async def flood(i: int) -> None:
            while not stop.is_set():
                await floods[i].submit(flood_work, mats[i])

        tasks = [asyncio.ensure_future(flood(i)) for i in range(3)] if flooding else []
        await asyncio.sleep(0.05 if flooding else 0)
        out = []
        for _ in range(samples):
            t0 = time.perf_counter()
            await g.submit(step, ids)
            out.append(time.perf_counter() - t0)
        stop.set()
        await asyncio.gather(*tasks)
        return out

    asyncio.run(latencies(False))  # warm
    alone = asyncio.run(latencies(False))
    flooded = asyncio.run(latencies(True))
    return {
        "alone_p50_ms": pct(alone, 50) * 1e3,
        "alone_p99_ms": pct(alone, 99) * 1e3,
        "flood_p50_ms": pct(flooded, 50) * 1e3,
        "flood_p99_ms": pct(flooded, 99) * 1e3,
    }


def summary(r: dict[str, Any]) -> list[Row]:
    if not r["measured"]:
        return [Row("torch_models", "four PyTorch models", "not measured", r["why"], "-", None)]
    rows = []
    for key, target in (("eager", None), ("graph", 2.0)):
        ratio = r[f"{key}_ours_tps"] / r[f"{key}_serial_tps"]
        rows.append(
            Row(
                "torch_models",
                f"4 GPT-2 models, batch 1, {key} steps through submit",
                f"{r[f'{key}_ours_tps']:.0f} tok/s ({ratio:.2f}x serialized)",
                f"serialized on one stream {r[f'{key}_serial_tps']:.0f} tok/s",
                f">={target}x serialized" if target else "(measured, explained)",
                ratio >= target if target else None,
                ratio,
            )
        )
    ratio = r["flood_p99_ms"] / r["alone_p99_ms"]
    rows.append(
        Row(
            "torch_models",
            "Guaranteed GPT-2 step p99 under a BestEffort flood",
            f"{r['flood_p99_ms']:.2f} ms (p50 {r['flood_p50_ms']:.2f}; {ratio:.2f}x alone)",
            f"alone p99 {r['alone_p99_ms']:.2f} ms (p50 {r['alone_p50_ms']:.2f})",
            "<=1.5x alone",
            ratio <= 1.5,
            ratio,
        )
    )
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(
        argv,
        __doc__,
        [
            ("--tokens", {"type": int, "default": 200}),
            ("--samples", {"type": int, "default": 200}),
        ],
        lambda a: _measure(a.backend, a.tokens, a.samples),
        summary,
    )


if __name__ == "__main__":
    main()
