"""The results page: ``bench/RESULTS.md`` rendered from the suite's JSON.

``pygpukit bench --json bench.json`` writes a self-describing result — the device, the
backend, the versions of Python, NumPy, CuPy, the CUDA runtime and the driver, the day (UTC)
and the git commit it ran — and one row per figure (value, baseline in the same run, ratio,
target, met). ``pygpukit bench --report bench.json -o bench/RESULTS.md`` renders it: a
header with where and when it ran, one table, and what bounds each missed target, in the
words of the benchmark that measured it (its ``BOUNDS``). Nothing on the page is written
by hand, so it never drifts from the run it shows.

    python -m pygpukit.benchmarks.report bench.json [-o bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._common import utc_day

__all__ = ("environment", "git_commit", "render")

#: What the rows' ``met`` reads as in the table.
_MET = {True: "yes", False: "**no**", None: "-"}


def git_commit(package_dir: Path | None = None) -> dict[str, Any] | None:
    """The commit of the checkout pygpukit runs from, or ``None`` outside one.

    Only a checkout whose ``pygpukit/`` is the package being run counts (not, say, a
    repository a virtual environment happens to sit in).

    :param package_dir: the package's directory (the running ``pygpukit`` by default)
    :return: ``{"commit": <40 hex digits>, "modified": <whether tracked files differ>}``
    """
    here = package_dir or Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if top / here.name != here:
            return None
        commit = git("rev-parse", "HEAD")
        modified = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "modified": modified}


def _driver_release() -> str | None:
    """The NVIDIA kernel driver's release (``580.159.04``), where Linux tells it."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


def _version_of(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(backend: str = "auto") -> dict[str, Any]:
    """Where a run happens: device, backend, versions, day (UTC) and commit.

    :param backend: the backend the suite runs on (``auto``, ``cuda`` or ``host``)
    :raises BackendUnavailable: the backend asked for cannot be used
    """
    from .. import __version__
    from ..runtime import Runtime

    with Runtime(backend=backend) as rt:
        device, backend_name = rt.device, rt.backend.name
    cuda = backend_name == "cuda"
    versions: dict[str, str | None] = {
        "pygpukit": __version__,
        "python": platform.python_version(),
        "numpy": _version_of("numpy"),
        "cupy": None,
        "cuda_runtime": None,
        "cuda_driver": device.driver,  # the CUDA version the driver supports
        "driver": None,
    }
    if cuda:
        import cupy

        rt_version = int(cupy.cuda.runtime.runtimeGetVersion())
        versions.update(
            cupy=str(cupy.__version__),
            cuda_runtime=f"{rt_version // 1000}.{(rt_version % 1000) // 10}",
            driver=_driver_release(),
        )
    return {
        "device": device.name,
        "backend": backend_name,
        "multiprocessors": device.multiprocessor_count,
        "compute_capability": device.compute_capability,
        "total_memory": device.total_memory,
        "versions": versions,
        "date": utc_day(),
        "git": git_commit(),
        "platform": platform.platform(),
    }


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _versions_line(v: dict[str, Any]) -> str:
    parts = [f"pygpukit {v.get('pygpukit')}", f"Python {v.get('python')}"]
    names = (
        ("numpy", "NumPy"),
        ("cupy", "CuPy"),
        ("cuda_runtime", "CUDA runtime"),
        ("cuda_driver", "driver's CUDA"),
        ("driver", "driver"),
    )
    parts += [f"{label} {v[key]}" for key, label in names if v.get(key)]
    return ", ".join(parts)


def _commit_line(git: dict[str, Any] | None) -> str:
    if not git:
        return "- (not run from a git checkout)"
    return str(git["commit"])[:12] + (" with uncommitted changes" if git.get("modified") else "")


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(data: dict[str, Any]) -> str:
    """The results page (Markdown) for one run of the suite, from its JSON.

    :param data: what ``pygpukit bench --json`` wrote
    :raises KeyError: ``data`` is not a suite result (no ``environment`` or ``summary``)
    """
    env, rows = data["environment"], data["summary"]
    device = f"{env['device']} ({env['backend']} backend"
    if env["backend"] == "cuda":
        device += f", {env['multiprocessors']} SMs, compute {env['compute_capability']}"
    lines = [
        "# Benchmark results",
        "",
        "Generated by `pygpukit bench --report` from the JSON the run below wrote; do not edit",
        "by hand: run the suite with `--json` and render it again. Every figure is measured in",
        "one process against a baseline measured in the same run. Targets are judged on CUDA",
        "only; on the host backend the suite runs the same code with nothing judged.",
        "",
        "| run | |",
        "|---|---|",
        f"| command | `{_cell(data.get('command', '?'))}` |",
        f"| device | {_cell(device)}) |",
        f"| versions | {_cell(_versions_line(env['versions']))} |",
        f"| date | {env['date']} (UTC) |",
        f"| commit | {_cell(_commit_line(env.get('git')))} |",
        "",
        "## Figures",
        "",
        "| benchmark | figure | value | baseline (same run) | ratio | target | met |",
        "|---|---|---|---|---:|---|---|",
    ]
    for r in rows:
        cells = (r["benchmark"], r["figure"], r["value"], r["baseline"])
        lines.append(
            "| "
            + " | ".join(_cell(c) for c in cells)
            + f" | {_ratio(r.get('ratio'))} | {_cell(r['target'])} | {_MET[r['met']]} |"
        )
    lines += ["", "## What bounds each miss", ""]
    missed: dict[str, list[str]] = {}
    for r in rows:
        if r["met"] is False:
            missed.setdefault(r["benchmark"], []).append(r["figure"])
    bounds = data.get("bounds", {})
    if missed:
        for name, figures in missed.items():
            text = bounds.get(name, "(the benchmark does not say)")
            lines.append(f"- **{name}** ({'; '.join(figures)}): {text}")
    elif any(r["met"] is not None for r in rows):
        lines.append("Every figure held to a target met it in this run.")
    else:
        lines.append(f"No target is judged on the {env['backend']} backend.")
    return "\n".join(lines) + "\n"


def write(data: dict[str, Any], output: str | None) -> None:
    """Render ``data`` to ``output`` (a path), or to standard output."""
    page = render(data)
    if output:
        Path(output).write_text(page)
    else:
        sys.stdout.write(page)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("json", help="what pygpukit bench --json wrote")
    p.add_argument("-o", "--output", help="write the page here (default: standard output)")
    args = p.parse_args(argv)
    import json

    with open(args.json) as f:
        write(json.load(f), args.output)


if __name__ == "__main__":
    main()
