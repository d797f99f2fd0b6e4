"""The public namespace: __all__ matches what modules export, and names read as public."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = ["pygpukit", "pygpukit.scheduler", "pygpukit.runtime", "pygpukit.lowlevel"]


@pytest.mark.parametrize("name", PUBLIC)
def test_all_matches_public_names(name: str) -> None:
    module = importlib.import_module(name)
    declared = set(module.__all__)
    public = {
        k
        for k, v in vars(module).items()
        if not k.startswith("_")
        and getattr(v, "__module__", None) is not None
        and not isinstance(v, type(importlib))
        and (getattr(v, "__module__", "") or "").startswith("pygpukit")
    }
    assert declared >= public, f"exported but not in __all__: {public - declared}"
    missing = [k for k in declared if not hasattr(module, k)]
    assert not missing, f"in __all__ but missing: {missing}"


def test_errors_read_as_top_level_names() -> None:
    import pygpukit

    assert pygpukit.VRAMBudgetExceeded.__module__ == "pygpukit"
    assert pygpukit.Runtime.__module__ == "pygpukit.runtime"
    assert issubclass(pygpukit.VRAMBudgetExceeded, pygpukit.PygpukitError)


def test_xp_is_the_default_runtimes_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYGPUKIT_BACKEND", "host")
    import pygpukit
    from pygpukit.scheduler import get_runtime

    assert pygpukit.xp is get_runtime().xp
