"""Backends, loaded by name once and cached (each module ends ``backend_class = ...``)."""

from __future__ import annotations

import importlib
import os
from functools import cache

from ..._exceptions import BackendUnavailable, InvalidArgument
from ._base import (
    Backend,
    CudaWarning,
    DeviceInfo,
    RawEvent,
    RawGraph,
    RawPool,
    RawStream,
    Signal,
)

__all__ = (
    "Backend",
    "CudaWarning",
    "DeviceInfo",
    "RawEvent",
    "RawGraph",
    "RawPool",
    "RawStream",
    "Signal",
    "backend_class",
    "resolve_backend_name",
)

NAMES = ("cuda", "host")


@cache
def backend_class(name: str) -> type[Backend]:
    """The backend class called ``name``.

    :raises BackendUnavailable: its library is missing (the message has the install hint)
    """
    if name not in NAMES:
        raise InvalidArgument(f"unknown backend {name!r}; use one of 'auto', 'cuda', 'host'")
    module = importlib.import_module(f"._{name}", __name__)
    cls: type[Backend] = module.backend_class
    return cls


def _gpu_visible() -> bool:
    try:
        cls = backend_class("cuda")
    except BackendUnavailable:
        return False
    from . import _cuda  # the module imported; CuPy is there

    del cls
    try:
        return int(_cuda.backend_class._device_count()) > 0
    except Exception:
        return False


def resolve_backend_name(name: str) -> str:
    """Turn ``"auto"`` into a concrete name: ``PYGPUKIT_BACKEND`` wins, then a visible GPU."""
    if name == "auto":
        name = os.environ.get("PYGPUKIT_BACKEND", "").strip().lower() or "auto"
    if name == "auto":
        return "cuda" if _gpu_visible() else "host"
    if name not in NAMES:
        raise InvalidArgument(
            f"unknown backend {name!r} (from the argument or PYGPUKIT_BACKEND); "
            "use 'auto', 'cuda' or 'host'"
        )
    return name
