"""Benchmark 10: PyTorch inside a context — budgeted allocation, and the cost of binding.

``allocate``: ``--n`` allocations of a ``--size``-byte torch tensor, each freed at once, per
round: inside a context session (PyTorch's caching allocator on the context's pool, its
segments charged to the context in C) against the same outside any session (PyTorch's own
allocator); the two alternate for 5 rounds, and the best round of each is compared.

``bind``: a task step's binding of the context and its undoing (CuPy's and PyTorch's current
stream, and PyTorch's pool for the thread) with torch present, against the same binding
without PyTorch's pool; per step.

On the host backend, or without a CUDA build of torch, nothing is measured.

    pygpukit bench --only torch_memory      (or: python -m pygpukit.benchmarks.torch_memory)
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ..runtime import QoSPolicy, Runtime, context_session
from ._common import Row, bench_main, per_call

ROUNDS = 5

#: What bounds a miss (``pygpukit bench --report`` prints it under the table).
BOUNDS = (
    "A cached PyTorch allocation costs the same inside a context as outside: PyTorch serves it "
    "from the pool's cache; only a new segment calls pygpukit's allocator, which charges the "
    "book under one mutex. Binding a step enters and leaves PyTorch's pool for the thread "
    "(three calls into PyTorch) on top of setting both libraries' streams."
)


def run(backend: str, n: int, size: int) -> dict[str, Any]:
    result: dict[str, Any] = {"size": size, "rounds": ROUNDS, "measured": False}
    if importlib.util.find_spec("torch") is None:
        return {**result, "why": "torch is not installed"}
    import torch

    with Runtime(backend=backend) as rt:
        result.update(device=rt.device.name, backend=rt.backend.name)
        if rt.backend.name != "cuda" or not torch.cuda.is_available():
            return {**result, "why": "no CUDA (torch runs on the CPU there, uncharged)"}
        ctx = rt.create_context("bench", max_vram=1 << 30, qos=QoSPolicy.BURSTABLE)

        def alloc() -> Any:
            return torch.empty(size, dtype=torch.uint8, device="cuda")

        ours: list[float] = []
        plain: list[float] = []
        with context_session(ctx):
            per_call(100, alloc)  # warm both caches
        per_call(100, alloc)
        for _ in range(ROUNDS):
            with context_session(ctx):
                ours.append(per_call(n, alloc))
            plain.append(per_call(n, alloc))

        raw = ctx.stream.raw
        backend_ = rt.backend

        def bind(route: bool) -> Any:
            def step() -> None:
                backend_.restore_stream(backend_.bind_stream(raw, route=route))

            return step

        routed: list[float] = []
        streams_only: list[float] = []
        for _ in range(ROUNDS):
            routed.append(per_call(n, bind(True)))
            streams_only.append(per_call(n, bind(False)))
        charged = ctx.usage().held
        return {
            **result,
            "measured": True,
            "ours_us": min(ours) * 1e6,
            "torch_us": min(plain) * 1e6,
            "bind_us": min(routed) * 1e6,
            "bind_streams_us": min(streams_only) * 1e6,
            "charged_bytes": charged,
        }


def summary(r: dict[str, Any]) -> list[Row]:
    if not r["measured"]:
        return [Row("torch_memory", "PyTorch in a context", "not measured", r["why"], "-", None)]
    ratio = r["ours_us"] / r["torch_us"]
    return [
        Row(
            "torch_memory",
            f"torch allocate+free of {r['size'] >> 10} KiB in a context",
            f"{r['ours_us']:.2f} us ({ratio:.2f}x torch)",
            f"torch's own allocator {r['torch_us']:.2f} us; "
            f"{r['charged_bytes'] >> 10} KiB charged to the context",
            "<=1.2x torch, and charged",
            # a context that charged nothing would be torch's own allocator timed twice
            ratio <= 1.2 and r["charged_bytes"] > 0,
            ratio,
        ),
        Row(
            "torch_memory",
            "binding a context for a task step, torch present",
            f"{r['bind_us']:.2f} us",
            f"streams only, no pool {r['bind_streams_us']:.2f} us",
            "<=10 us",
            r["bind_us"] <= 10.0,
            r["bind_us"],
        ),
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return bench_main(
        argv,
        __doc__,
        [
            ("--n", {"type": int, "default": 20_000}),
            ("--size", {"type": int, "default": 1 << 20}),
        ],
        lambda a: run(a.backend, a.n, a.size),
        summary,
    )


if __name__ == "__main__":
    main()
