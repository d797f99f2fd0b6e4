"""``pygpukit info``, ``demo``, ``bench``, ``soak`` and ``top``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ._exceptions import _fmt_bytes


def _pytorch_row(rt: Any) -> str:
    """Whether PyTorch's CUDA allocations would be charged to contexts, and if not, why."""
    charged, why = rt.pytorch_charged()
    return "its CUDA allocations charged to contexts" if charged else f"not charged: {why}"


def _info(args: argparse.Namespace) -> int:
    from .runtime import Runtime

    with Runtime(backend=args.backend) as rt:
        d = rt.device
        free, total = rt.backend.mem_get_info()
        bridge = rt.bridge.stats()
        rows = {
            "backend": d.backend,
            "device": f"{d.device_id}: {d.name}",
            "total memory": _fmt_bytes(total),
            "free memory": _fmt_bytes(free),
            "managed by pygpukit": _fmt_bytes(rt.ledger.capacity),
            "stream priorities": (
                f"{d.priority_range[0]} (least) .. {d.priority_range[1]} (greatest)"
            ),
            "multiprocessors": str(d.multiprocessor_count),
            "compute capability": d.compute_capability or "-",
            "driver": d.driver or "-",
            "completion bridge": "native (GIL-free host function + eventfd)"
            if bridge.native
            else "pure Python (extension not built)",
            "completion signals": (
                f"shared by up to {rt.bridge.coalesce} waiters of a busy stream (PYGPUKIT_COALESCE)"
                if rt.bridge.coalesce > 1
                else "one per waiter (PYGPUKIT_COALESCE=1)"
            ),
        }
        stream_ordered = bool(getattr(rt.backend, "stream_ordered", False))
        if d.backend == "cuda":
            idle_s = float(getattr(rt.backend, "pool_idle_s", 0.0))
            rows["device memory"] = (
                "stream-ordered pool per runtime (cudaMallocFromPoolAsync); unused memory "
                f"back to the driver after {idle_s:g} s quiet (PYGPUKIT_POOL_IDLE_S)"
                if stream_ordered
                else "cudaMalloc (PYGPUKIT_STREAM_ORDERED=0, or no pool support)"
            )
        rows["pytorch"] = _pytorch_row(rt)
        if args.json:
            print(
                json.dumps(
                    {
                        **d.__dict__,
                        "free_memory": free,
                        "bridge_native": bridge.native,
                        "stream_ordered": stream_ordered,
                    }
                )
            )
        else:
            width = max(map(len, rows))
            for key, value in rows.items():
                print(f"{key:<{width}}  {value}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo import run_demo

    run_demo(
        args.backend,
        requests={"interactive": args.interactive, "standard": args.standard, "batch": args.batch},
        size=args.size,
        tokens=args.tokens,
        trace=Path(args.trace) if args.trace else None,
        png=Path(args.png) if args.png else None,
        torch=args.torch,
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from ._exceptions import InvalidArgument
    from .benchmarks import dump, run_suite
    from .benchmarks.report import write

    if args.output and args.report is None:
        raise InvalidArgument("-o names where --report writes the page; add --report")
    if args.report:  # render an earlier run: nothing runs
        if args.only or args.quick or args.backend or args.json:
            raise InvalidArgument(
                "--report JSON renders an earlier run; --only, --quick, --backend and --json "
                "apply to a new one (use --report without JSON to run and render)"
            )
        try:
            with open(args.report) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot read {args.report!r} as suite JSON: {exc}") from None
        if not isinstance(data, dict) or "environment" not in data or "summary" not in data:
            raise InvalidArgument(
                f"{args.report!r} is not what 'pygpukit bench --json' writes (no environment "
                "or summary); run the suite again with --json"
            )
        write(data, args.output)
        return 0
    only = [n.strip() for n in args.only.split(",")] if args.only else None
    path = args.json
    result = run_suite(
        only,
        backend=args.backend or "auto",
        quick=args.quick,
        after_each=(lambda run: dump(run, path)) if path else None,
    )
    if args.report is not None:
        write(result, args.output)
    return 0


def _soak(args: argparse.Namespace) -> int:
    from .benchmarks.soak import from_arguments

    return 0 if from_arguments(args)["ok"] else 1


def _top(args: argparse.Namespace) -> int:
    from ._exceptions import InvalidArgument
    from .observe.top import run_top

    if args.interval <= 0:
        raise InvalidArgument(f"--interval must be positive seconds, not {args.interval}")
    url = args.url if "://" in args.url else f"http://{args.url}"
    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    try:
        return run_top(url, interval=args.interval, once=args.once)
    except OSError as exc:  # --once against a server that is not there
        print(f"pygpukit: error: cannot read {url}: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pygpukit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="show the device pygpukit would use")
    info.add_argument("--backend", default="auto", choices=("auto", "cuda", "host"))
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)
    demo = sub.add_parser("demo", help="serve the assistant pipeline on three QoS tiers")
    demo.add_argument("--backend", default="auto", choices=("auto", "cuda", "host"))
    demo.add_argument("--interactive", type=int, default=4, help="Guaranteed-tier requests")
    demo.add_argument("--standard", type=int, default=4, help="Burstable-tier requests")
    demo.add_argument("--batch", type=int, default=8, help="BestEffort-tier requests")
    demo.add_argument("--tokens", type=int, default=48, help="tokens generated per request")
    demo.add_argument("--size", default="auto", choices=("auto", "small", "large"))
    demo.add_argument("--trace", default="pygpukit-demo-trace.json", help="Chrome-trace JSON")
    demo.add_argument("--png", default="pygpukit-demo-timeline.png", help="timeline picture")
    demo.add_argument(
        "--torch",
        action="store_true",
        help="the assistants on Hugging Face transformers models (GPT-2 -> VITS, PyTorch)",
    )
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="run the benchmark suite against its baselines")
    bench.add_argument("--backend", choices=("auto", "cuda", "host"), help="default: auto")
    bench.add_argument("--only", help="comma-separated benchmark names (see --help)")
    bench.add_argument("--json", help="write all results here")
    bench.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    bench.add_argument(
        "--report",
        nargs="?",
        const="",
        metavar="JSON",
        help="render the results page (bench/RESULTS.md) from JSON an earlier --json wrote; "
        "without JSON, run the suite and render this run",
    )
    bench.add_argument("-o", "--output", help="write the --report page here (default: stdout)")
    bench.set_defaults(func=_bench)
    soak = sub.add_parser(
        "soak", help="churn contexts under many submits; check that nothing grows or leaks"
    )
    from .benchmarks.soak import add_arguments

    add_arguments(soak)
    soak.set_defaults(func=_soak)
    top = sub.add_parser(
        "top", help="a live view of a running server's contexts, from its /metrics (q quits)"
    )
    top.add_argument("url", help="the server, e.g. 127.0.0.1:8000 or http://host:8000/metrics")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    top.set_defaults(func=_top)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except Exception as exc:  # a clear line, not a traceback, for expected failures
        from ._exceptions import PygpukitError

        if isinstance(exc, PygpukitError):
            print(f"pygpukit: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
