"""Bad input raises typed errors with pinned messages and leaves nothing half-created."""

from __future__ import annotations

import pytest

from pygpukit import (
    GB,
    MB,
    ContextClosed,
    DuplicateContextName,
    InvalidArgument,
    PygpukitError,
    QoSPolicy,
    context_session,
)
from pygpukit.runtime import Runtime, Stream


def _nothing_created(rt: Runtime, names: list[str], reserved: int) -> None:
    assert [c.name for c in rt.contexts] == names
    assert rt.ledger.reserved_total() == reserved


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"max_vram": 0},
            r"^max_vram must be positive, got 0; e\.g\. max_vram=2 \* GB$",
        ),
        (
            {"max_vram": -5},
            r"^max_vram must be positive, got -5; e\.g\. max_vram=2 \* GB$",
        ),
        (
            {"max_vram": 1.5},
            r"^max_vram must be an int number of bytes \(e\.g\. 4 \* GB\), not 1\.5$",
        ),
        (
            {"max_vram": 2 * MB, "base_vram": 4 * MB},
            r"^base_vram \(4194304\) must not exceed max_vram \(2097152\); raise max_vram or "
            r"lower base_vram$",
        ),
        (
            {"max_vram": MB, "base_vram": -1},
            r"^base_vram must not be negative, got -1; e\.g\. base_vram=2 \* GB$",
        ),
        (
            {"max_vram": MB, "qos": "platinum"},
            r"^unknown QoS tier 'platinum'; use QoSPolicy\.GUARANTEED, QoSPolicy\.BURSTABLE or "
            r"QoSPolicy\.BEST_EFFORT$",
        ),
        (
            {"max_vram": MB, "base_vram": MB, "qos": QoSPolicy.GUARANTEED},
            r"^base_vram applies to BURSTABLE contexts only; GUARANTEED reserves max_vram — "
            r"drop base_vram or use qos=QoSPolicy\.BURSTABLE$",
        ),
        (
            {"max_vram": 64 * GB},
            r"^max_vram \(68719476736\) exceeds what this runtime manages \(1073741824 bytes "
            r"on .*\); lower it$",
        ),
    ],
)
def test_bad_create_context_arguments(
    host_rt: Runtime, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        host_rt.create_context("m", **kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, (ValueError, PygpukitError))
    _nothing_created(host_rt, [], 0)


def test_bad_names(host_rt: Runtime) -> None:
    for bad in ("", "   ", None, 3):
        with pytest.raises(InvalidArgument, match=r"^context name must be a non-empty str"):
            host_rt.create_context(bad, max_vram=MB)  # type: ignore[arg-type]
    _nothing_created(host_rt, [], 0)


def test_duplicate_name(host_rt: Runtime) -> None:
    host_rt.create_context("llm", max_vram=MB, qos=QoSPolicy.GUARANTEED)
    with pytest.raises(
        DuplicateContextName,
        match=r"^a context named 'llm' already exists; pick another name or destroy_context\(\) "
        r"the existing one first$",
    ):
        host_rt.create_context("llm", max_vram=2 * MB, qos=QoSPolicy.GUARANTEED)
    _nothing_created(host_rt, ["llm"], MB)


def test_context_session_rejects_non_contexts() -> None:
    with pytest.raises(
        InvalidArgument,
        match=r"^context_session\(\) takes an ExecutionContext, not str; create one with "
        r"create_context\(name, max_vram=\.\.\.\)$",
    ):
        context_session("llm")  # type: ignore[arg-type]


def test_use_after_destroy(host_rt: Runtime) -> None:
    ctx = host_rt.create_context("gone", max_vram=MB, qos=QoSPolicy.GUARANTEED)
    host_rt.destroy_context(ctx)
    host_rt.destroy_context(ctx)  # idempotent
    message = (
        r"^context 'gone' was destroyed; create a new context with create_context\(\) instead "
        r"of reusing a destroyed one$"
    )
    with pytest.raises(ContextClosed, match=message), context_session(ctx):
        pass
    with pytest.raises(ContextClosed, match=message):
        ctx.record_event()
    _nothing_created(host_rt, [], 0)
    assert repr(ctx).endswith("state=closed>")


def test_destroy_inside_a_session_stops_new_allocations(host_rt: Runtime) -> None:
    ctx = host_rt.create_context("mid", max_vram=4 * MB)
    with context_session(ctx):
        keep = host_rt.xp.empty(MB, dtype="uint8")
        host_rt.destroy_context(ctx)
        with pytest.raises(ContextClosed):
            host_rt.xp.empty(MB, dtype="uint8")
        assert ctx.usage().used == MB  # still charged until freed
        del keep
    assert ctx.usage().used == 0


def test_handles_cannot_be_constructed_directly() -> None:
    with pytest.raises(TypeError, match=r"^Stream objects cannot be instantiated directly"):
        Stream()
    from pygpukit import Event, ExecutionContext

    with pytest.raises(TypeError, match=r"^Event objects cannot be instantiated directly"):
        Event()
    with pytest.raises(TypeError, match=r"^ExecutionContext objects cannot be instantiated"):
        ExecutionContext()


def test_bad_stream_priority(host_rt: Runtime) -> None:
    with pytest.raises(
        InvalidArgument,
        match=r"^stream priority 3 is outside this device's range -5 \(greatest\) to 0 \(least\)$",
    ):
        host_rt.create_stream(priority=3)


def test_unknown_backend() -> None:
    with pytest.raises(InvalidArgument, match=r"^unknown backend 'tpu'"):
        Runtime(backend="tpu")


def test_cuda_without_gpu_says_how_to_fix() -> None:
    from conftest import CUDA

    if CUDA:
        pytest.skip("a GPU is visible here")
    from pygpukit import BackendUnavailable

    with pytest.raises(BackendUnavailable, match=r"pygpukit\[cuda1[23]\]|backend='host'"):
        Runtime(backend="cuda")
