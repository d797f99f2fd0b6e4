"""Memory-pressure handlers: consulted once per request, never re-entered, and a handler
that fails is reported with the budget error it could not prevent."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pygpukit import MB, BudgetReason, QoSPolicy, VRAMBudgetExceeded, context_session
from pygpukit.runtime import ExecutionContext, Runtime


@pytest.fixture
def small_rt() -> Any:
    runtime = Runtime(backend="host", vram_limit=64 * MB)
    try:
        yield runtime
    finally:
        runtime.close()


def _squeezed(rt: Runtime) -> ExecutionContext:
    """A BestEffort context with 8 MiB of spare capacity left to it."""
    rt.create_context("g", max_vram=56 * MB, qos=QoSPolicy.GUARANTEED)
    return rt.create_context("be", max_vram=32 * MB, qos=QoSPolicy.BEST_EFFORT)


def test_a_handler_allocating_in_its_own_context_is_not_asked_again(small_rt: Runtime) -> None:
    be = _squeezed(small_rt)
    calls: list[tuple[int, int]] = []
    kept: list[object] = []

    def handler(ctx: ExecutionContext, requested: int, available: int) -> bool:
        calls.append((requested, available))
        with context_session(ctx):  # its own allocation, under the same pressure
            kept.append(small_rt.xp.empty(requested, dtype="uint8"))
        return True

    small_rt.on_memory_pressure(handler)
    with context_session(be):
        small = small_rt.xp.empty(4 * MB, dtype="uint8")  # fits: no handler
        assert calls == []
        with pytest.raises(VRAMBudgetExceeded) as info:
            small_rt.xp.empty(6 * MB, dtype="uint8")  # 4 MiB left: the handler is asked
    assert calls == [(6 * MB, 4 * MB)]  # once: its own request was decided without it
    err = info.value
    # the handler's own request failed (the tier's policy found no room either) ...
    cause = err.__cause__
    assert isinstance(cause, VRAMBudgetExceeded)
    assert (cause.requested, cause.reason) == (6 * MB, BudgetReason.UNRESERVED)
    # ... and the caller learns about both: the budget error, the handler's failure
    assert (err.context, err.requested, err.reason) == ("be", 6 * MB, BudgetReason.HANDLER)
    assert err.handler is not None and err.handler.endswith("handler")
    assert any("raised VRAMBudgetExceeded" in note for note in err.__notes__)
    assert kept == []
    assert be.usage().used == 4 * MB  # nothing half-charged by either request
    del small


def test_a_handler_may_allocate_what_fits_and_make_room(small_rt: Runtime) -> None:
    be = _squeezed(small_rt)
    calls: list[int] = []
    cache: list[object] = []

    def handler(ctx: ExecutionContext, requested: int, available: int) -> bool:
        calls.append(requested)
        with context_session(ctx):
            scratch = small_rt.xp.empty(MB, dtype="uint8")  # fits: no pressure, no handler
        del scratch
        cache.clear()  # frees 4 MiB: room for the request
        return True

    small_rt.on_memory_pressure(handler)
    with context_session(be):
        cache.append(small_rt.xp.empty(4 * MB, dtype="uint8"))
        b = small_rt.xp.empty(6 * MB, dtype="uint8")  # 4 MiB left: the handler makes room
    assert calls == [6 * MB]
    assert be.usage().used == 6 * MB
    del b
    assert be.usage().used == 0


def test_a_handler_that_raises_is_reported_with_the_budget_error(small_rt: Runtime) -> None:
    be = _squeezed(small_rt)
    second: list[int] = []

    def broken(ctx: ExecutionContext, requested: int, available: int) -> bool:
        raise KeyError("cache index")

    small_rt.on_memory_pressure(broken)
    small_rt.on_memory_pressure(lambda c, r, a: bool(second.append(r)) or True)
    with context_session(be), pytest.raises(VRAMBudgetExceeded) as info:
        small_rt.xp.empty(16 * MB, dtype="uint8")
    err = info.value
    assert isinstance(err, MemoryError)
    assert err.reason is BudgetReason.HANDLER
    assert err.handler is not None and err.handler.endswith("broken")
    assert isinstance(err.__cause__, KeyError)
    assert err.__notes__ == [
        f"the memory-pressure handler {err.handler} raised KeyError('cache index'); it "
        "counts as a refusal (see the exception's cause)"
    ]
    assert second == []  # a failed handler refuses: the ones after it are not asked
    assert be.usage().held == 0


def test_a_raising_handler_past_max_vram_still_names_max_vram(small_rt: Runtime) -> None:
    ctx = small_rt.create_context("small", max_vram=4 * MB)

    def broken(ctx: ExecutionContext, requested: int, available: int) -> bool:
        raise RuntimeError("no")

    small_rt.on_memory_pressure(broken)
    with context_session(ctx), pytest.raises(VRAMBudgetExceeded) as info:
        small_rt.xp.empty(8 * MB, dtype="uint8")
    assert info.value.reason is BudgetReason.MAX_VRAM
    assert isinstance(info.value.__cause__, RuntimeError)


def test_interrupts_from_a_handler_are_not_turned_into_budget_errors(small_rt: Runtime) -> None:
    be = _squeezed(small_rt)

    def interrupted(ctx: ExecutionContext, requested: int, available: int) -> bool:
        raise KeyboardInterrupt

    small_rt.on_memory_pressure(interrupted)
    with context_session(be), pytest.raises(KeyboardInterrupt):
        small_rt.xp.empty(16 * MB, dtype="uint8")
    small_rt.remove_memory_pressure_handler(interrupted)
    # the ledger is not stuck in "handlers running": a new handler is consulted
    asked: list[int] = []
    small_rt.on_memory_pressure(lambda c, r, a: bool(asked.append(r)))
    with context_session(be), pytest.raises(VRAMBudgetExceeded):
        small_rt.xp.empty(16 * MB, dtype="uint8")
    assert asked == [16 * MB]


def test_handlers_run_by_another_thread_are_consulted_there(small_rt: Runtime) -> None:
    """Skipping handlers is per thread: a handler that waits for another thread's
    allocation under pressure does not hide the handlers from that thread."""
    be = _squeezed(small_rt)
    asked: list[str] = []
    errors: dict[str, BaseException] = {}

    def allocate() -> None:
        try:
            with context_session(be):
                small_rt.xp.empty(16 * MB, dtype="uint8")
        except BaseException as exc:
            errors[threading.current_thread().name] = exc

    def handler(ctx: ExecutionContext, requested: int, available: int) -> bool:
        asked.append(threading.current_thread().name)
        if threading.current_thread().name == "outer":
            t = threading.Thread(target=allocate, name="inner")
            t.start()
            t.join()
        return False

    small_rt.on_memory_pressure(handler)
    t = threading.Thread(target=allocate, name="outer")
    t.start()
    t.join()
    assert asked == ["outer", "inner"]
    assert sorted(errors) == ["inner", "outer"]
    assert all(isinstance(e, VRAMBudgetExceeded) for e in errors.values())
