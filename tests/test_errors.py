"""Bad input raises typed errors with pinned messages and leaves nothing half-created."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
from pydantic import BaseModel

import pygpukit
from pygpukit import (
    GB,
    MB,
    AdmissionRejected,
    BudgetReason,
    ContextClosed,
    CudaError,
    DeadlineExceeded,
    DuplicateContextName,
    InvalidArgument,
    InvalidArgumentType,
    PygpukitError,
    QoSPolicy,
    VRAMBudgetExceeded,
    context_session,
)
from pygpukit.pipeline import Pipeline, stage
from pygpukit.runtime import Runtime, Stream
from pygpukit.runtime.checks import check_bytes, check_instance, check_name, check_number


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
    for bad in ("", "   "):
        with pytest.raises(InvalidArgument, match=r"^context name must be a non-empty str"):
            host_rt.create_context(bad, max_vram=MB)
    _nothing_created(host_rt, [], 0)


@pytest.mark.parametrize("bad", [None, 3])
def test_a_name_of_the_wrong_type_is_a_type_error(host_rt: Runtime, bad: object) -> None:
    with pytest.raises(
        InvalidArgumentType, match=rf"^context name must be a non-empty str, not {bad!r}"
    ):
        host_rt.create_context(bad, max_vram=MB)  # type: ignore[arg-type]
    _nothing_created(host_rt, [], 0)


def test_a_budget_of_the_wrong_type_is_a_type_error(host_rt: Runtime) -> None:
    with pytest.raises(
        InvalidArgumentType,
        match=r"^max_vram must be an integer number of bytes \(e\.g\. 4 \* GB\), not 1\.5$",
    ):
        host_rt.create_context("m", max_vram=1.5)  # type: ignore[arg-type]
    _nothing_created(host_rt, [], 0)


def test_numpy_integers_are_budgets(host_rt: Runtime) -> None:
    ctx = host_rt.create_context(
        "m", max_vram=np.int64(4 * MB), base_vram=np.uint32(MB), qos="burstable"
    )
    assert (ctx.max_vram, ctx.usage().reserved) == (4 * MB, MB)
    assert type(ctx.max_vram) is int


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
        PygpukitError,
        match=r"^context_session\(\) takes an ExecutionContext, not str; create one with "
        r"create_context\(name, max_vram=\.\.\.\)$",
    ):
        context_session("llm")  # type: ignore[arg-type]


def test_except_type_error_catches_a_session_of_a_name() -> None:
    with pytest.raises(TypeError, match=r"^context_session\(\) takes an ExecutionContext"):
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


# -- the error kinds ------------------------------------------------------------------------


def test_a_wrong_type_and_a_wrong_value_keep_pythons_categories() -> None:
    assert issubclass(InvalidArgumentType, PygpukitError)
    assert issubclass(InvalidArgumentType, TypeError)
    assert not issubclass(InvalidArgumentType, ValueError)
    assert issubclass(InvalidArgument, ValueError) and not issubclass(InvalidArgument, TypeError)
    for name in ("InvalidArgumentType", "BudgetReason"):
        assert getattr(pygpukit, name).__module__ == "pygpukit"
    assert pickle.loads(pickle.dumps(BudgetReason.HANDLER)) is BudgetReason.HANDLER


@pytest.mark.parametrize(
    "error",
    [
        VRAMBudgetExceeded("tts", 3 * GB, GB, 4 * GB, BudgetReason.HANDLER, handler=lambda: 0),
        VRAMBudgetExceeded(None, MB, 0, GB, BudgetReason.UNRESERVED, tier=QoSPolicy.BURSTABLE),
        VRAMBudgetExceeded("c", 1, 0, 1, "a custom limit"),
        DeadlineExceeded("pipeline 'p'", 0.5, ["a"]),
        AdmissionRejected("context 'c'", "it must reserve 1 B"),
        ContextClosed("gone"),
        DuplicateContextName("llm"),
        CudaError("the device faulted", status=700),
        InvalidArgumentType("x must be a str"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_survive_pickling_with_their_fields(error: PygpukitError) -> None:
    # e.g. raised in a worker process: rebuilt from its fields, the same message
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    fields = {k: v for k, v in vars(error).items() if k != "_init"}
    assert {k: v for k, v in vars(copy).items() if k != "_init"} == fields


# -- byte counts and the other shared checks -----------------------------------------------


class _Index:
    def __index__(self) -> int:
        return 7


@pytest.mark.parametrize(
    ("value", "expected"),
    [(4 * GB, 4 * GB), (np.int64(4 * GB), 4 * GB), (np.uint32(5), 5), (_Index(), 7)],
)
def test_check_bytes_takes_any_integer_type(value: object, expected: int) -> None:
    n = check_bytes(value, "max_vram")
    assert n == expected and type(n) is int


@pytest.mark.parametrize("value", [1.5, np.float64(4.0), "4GB", None, True, np.bool_(True)])
def test_check_bytes_refuses_other_types(value: object) -> None:
    with pytest.raises(InvalidArgumentType) as info:
        check_bytes(value, "max_vram")
    assert str(info.value) == (
        f"max_vram must be an integer number of bytes (e.g. 4 * GB), not {value!r}"
    )


def test_check_bytes_states_the_rule_and_the_fix() -> None:
    with pytest.raises(
        InvalidArgument, match=r"^quota must be positive, got 0; e\.g\. quota=2 \* GB$"
    ):
        check_bytes(0, "quota")
    with pytest.raises(
        InvalidArgument, match=r"^nbytes must not be negative, got -3; e\.g\. nbytes=2 \* GB$"
    ):
        check_bytes(np.int64(-3), "nbytes", allow_zero=True)
    assert check_bytes(0, "nbytes", allow_zero=True) == 0


def test_the_other_checks() -> None:
    assert check_name("llm", "name") == "llm"
    with pytest.raises(InvalidArgumentType, match=r"^name must be a non-empty str, not b'x'; "):
        check_name(b"x", "name")
    with pytest.raises(InvalidArgument, match=r"^name must be a non-empty str, not ' '; pass a"):
        check_name(" ", "name")
    assert check_instance(3, int, "n") == 3
    with pytest.raises(InvalidArgumentType, match=r"^n must be a int, not '3'; pass an int$"):
        check_instance("3", int, "n", "pass an int")
    assert check_number(np.float32(0.5), "share", low=0.0, high=1.0) == 0.5
    with pytest.raises(InvalidArgument, match=r"^share must be in \(0, 1\), got 1; e\.g\. 0\.5$"):
        check_number(1, "share", low=0.0, high=1.0, low_open=True, high_open=True, hint="e.g. 0.5")
    with pytest.raises(InvalidArgument, match=r"^s must be a finite number >= 0, got inf$"):
        check_number(float("inf"), "s", low=0.0)
    with pytest.raises(InvalidArgumentType, match=r"^s must be a number, not True$"):
        check_number(True, "s")


# -- advice that fits the reason --------------------------------------------------------


def _budget(reason: BudgetReason | str, **fields: Any) -> str:
    return str(VRAMBudgetExceeded("tts", 3 * GB, GB, 4 * GB, reason, **fields))


def refuse_all(ctx: object, requested: int, available: int) -> bool:
    return False


def test_each_budget_reason_has_its_own_advice() -> None:
    head = "context 'tts' asked for 3 GiB but only 1 GiB is available"
    assert _budget(BudgetReason.MAX_VRAM) == (
        f"{head} within its budget of 4 GiB (past max_vram); free arrays, allocate less, or "
        "create the context with a larger max_vram"
    )
    assert _budget(BudgetReason.HANDLER, handler=refuse_all) == (
        f"{head} (its max_vram is 4 GiB) and the memory-pressure handler refuse_all() refused "
        "to let the runtime make room; free memory in other contexts, or change the handler "
        "registered with on_memory_pressure()"
    )
    assert _budget(BudgetReason.UNRESERVED, tier=QoSPolicy.BURSTABLE) == (
        f"{head} (its max_vram is 4 GiB): a BURSTABLE context takes the memory beyond its "
        "base_vram from unreserved memory, and not enough is unreserved; free memory "
        "elsewhere, reserve it up front (a larger base_vram, or qos=QoSPolicy.GUARANTEED), or "
        "lower other contexts' reservations"
    )
    assert "a BEST_EFFORT context takes all its memory from unreserved memory" in _budget(
        BudgetReason.UNRESERVED, tier=QoSPolicy.BEST_EFFORT
    )
    assert str(VRAMBudgetExceeded(None, MB, 0, GB, BudgetReason.UNRESERVED)) == (
        "an allocation outside any context asked for 1 MiB but only 0 B is available: an "
        "allocation outside any context takes its memory from unreserved memory, and not "
        "enough is unreserved; free memory elsewhere, or allocate inside the "
        "context_session() of a context that reserves it"
    )
    assert _budget(BudgetReason.PARTITION, partition="inference") == (
        f"{head} within the 4 GiB memory limit of partition 'inference'; free memory in the "
        "partition's contexts, or give the partition a larger memory limit"
    )
    assert _budget(BudgetReason.FRAGMENTED) == (
        f"{head} in one piece of its 4 GiB reservation (its reserved memory is fragmented); "
        "free neighbouring arrays, allocate smaller pieces, or create the context with a "
        "larger max_vram"
    )
    advice = {_budget(r).split("; ", 1)[-1] for r in BudgetReason}
    assert len(advice) == len(BudgetReason)  # no two reasons share their advice


def test_older_text_reasons_still_construct() -> None:
    # the texts the ledger and the backends pass today map to their reason
    for text, reason in [
        ("past max_vram", BudgetReason.MAX_VRAM),
        ("a memory-pressure handler refused", BudgetReason.HANDLER),
        ("its reserved memory is fragmented", BudgetReason.FRAGMENTED),
    ]:
        assert VRAMBudgetExceeded("c", 1, 0, 1, text).reason is reason
    err = VRAMBudgetExceeded("c", 2 * MB, MB, 4 * MB, "a custom limit")
    assert err.reason == "a custom limit"
    assert str(err).endswith(
        "within its budget of 4 MiB (a custom limit); free arrays, "
        "allocate less, or create the context with a larger max_vram"
    )
    assert VRAMBudgetExceeded("c", 1, 0, 1).reason is BudgetReason.MAX_VRAM


def test_a_refusing_handler_gets_handler_advice(host_rt: Runtime) -> None:
    host_rt.on_memory_pressure(refuse_all)
    be = host_rt.create_context("be", max_vram=64 * MB, qos=QoSPolicy.BEST_EFFORT)
    host_rt.create_context("g", max_vram=host_rt.ledger.capacity - 8 * MB, qos="guaranteed")
    with (
        context_session(be),
        pytest.raises(
            VRAMBudgetExceeded,
            match=r"^context 'be' asked for 16 MiB but only 8 MiB is available \(its max_vram "
            r"is 64 MiB\) and .* refused to let the runtime make room; free memory in other "
            r"contexts, or change the handler registered with on_memory_pressure\(\)$",
        ) as info,
    ):
        host_rt.xp.empty(16 * MB, dtype="uint8")
    assert info.value.reason is BudgetReason.HANDLER


def test_a_refusing_handler_is_named(host_rt: Runtime) -> None:
    host_rt.on_memory_pressure(refuse_all)
    be = host_rt.create_context("be", max_vram=64 * MB, qos=QoSPolicy.BEST_EFFORT)
    host_rt.create_context("g", max_vram=host_rt.ledger.capacity - 8 * MB, qos="guaranteed")
    with context_session(be), pytest.raises(VRAMBudgetExceeded) as info:
        host_rt.xp.empty(16 * MB, dtype="uint8")
    assert info.value.handler == "refuse_all"
    assert "the memory-pressure handler refuse_all() refused" in str(info.value)


def test_short_unreserved_memory_advises_reserving(host_rt: Runtime) -> None:
    be = host_rt.create_context("be", max_vram=64 * MB, qos=QoSPolicy.BEST_EFFORT)
    host_rt.create_context("g", max_vram=host_rt.ledger.capacity - 8 * MB, qos="guaranteed")
    with context_session(be), pytest.raises(VRAMBudgetExceeded) as info:
        host_rt.xp.empty(16 * MB, dtype="uint8")
    assert (info.value.reason, info.value.tier) == (BudgetReason.UNRESERVED, "BEST_EFFORT")
    assert str(info.value) == (
        "context 'be' asked for 16 MiB but only 8 MiB is available (its max_vram is 64 MiB): "
        "a BEST_EFFORT context takes all its memory from unreserved memory, and not enough is "
        "unreserved; free memory elsewhere, reserve it up front (a larger base_vram, or "
        "qos=QoSPolicy.GUARANTEED), or lower other contexts' reservations"
    )


# -- one wording for a missed deadline ---------------------------------------------------


def test_deadline_exceeded_is_worded_from_its_fields() -> None:
    queued = DeadlineExceeded("task 'step' of context 'llm'", 0.0123)
    assert str(queued) == (
        "task 'step' of context 'llm' missed its deadline by 12.3 ms before it started "
        "(nothing ran); give it a later deadline, a higher priority or tier, or less work "
        "queued ahead of it"
    )
    assert (queued.what, queued.late_s, queued.cancelled) == (
        "task 'step' of context 'llm'",
        0.0123,
        None,
    )
    cut = DeadlineExceeded("pipeline 'chat'", 0.0004, cancelled=["llm", "tts"])
    assert str(cut) == (
        "pipeline 'chat' missed its deadline by 0.4 ms while running (cancelled: 'llm', "
        "'tts'); give it a later deadline, a higher priority or tier, or less work queued "
        "ahead of it"
    )
    assert cut.cancelled == ("llm", "tts")
    assert "while running (cancelled: none)" in str(DeadlineExceeded("pipeline 'p'", 0, []))
    assert DeadlineExceeded("x", -0.5).late_s == 0.0  # a clock read early is not "early"
    assert isinstance(queued, TimeoutError)


# -- type checks in the pipeline layer --------------------------------------------------


class _In(BaseModel):
    text: str


class _Out(BaseModel):
    text: str


@stage("te_echo")
async def _echo(inp: _In) -> _Out:
    return _Out(text=inp.text)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda rt: Pipeline(3, runtime=rt), r"^pipeline name must be a non-empty str, not 3"),
        (lambda rt: Pipeline("p", runtime="rt"), r"^runtime must be a Runtime or None, not 'rt'"),
        (lambda rt: Pipeline("p", runtime=rt).add(42), r"^add\(\) takes a Stage"),
        (
            lambda rt: Pipeline("p", runtime=rt).add(_echo, inputs=["text"]),
            r"^inputs must be a mapping of input field to source",
        ),
        (
            lambda rt: Pipeline("p", runtime=rt).add(_echo, context=5),
            r"^context must be a context name or an ExecutionContext, not 5",
        ),
        (lambda rt: Pipeline("p", runtime=rt).add(_echo, id=5), r"^stage id must be a str, not 5"),
        (lambda rt: stage("x", context=5), r"^stage context must be a context name"),
    ],
)
def test_pipeline_type_errors_are_type_errors(host_rt: Runtime, call: Any, message: str) -> None:
    with pytest.raises(InvalidArgumentType, match=message) as info:
        call(host_rt)
    assert isinstance(info.value, TypeError)


@pytest.mark.anyio
async def test_a_request_with_a_priority_of_the_wrong_type_is_a_type_error(
    host_rt: Runtime,
) -> None:
    p = Pipeline("p", runtime=host_rt).add(_echo)
    with pytest.raises(InvalidArgumentType, match=r"^priority must be an int"):
        await p.run({"text": "hi"}, priority="high")
    with pytest.raises(
        InvalidArgumentType, match=r"^deadline must be a time on the runtime.s clock"
    ):
        await p.run({"text": "hi"}, deadline="soon")


def test_a_type_error_is_a_422_over_http() -> None:
    pytest.importorskip("fastapi")
    from pygpukit.integrations.fastapi import error_response

    assert error_response(InvalidArgumentType("x must be a str")).status_code == 422
    assert error_response(InvalidArgument("x must be positive")).status_code == 422
