"""Sessions end in the reverse order they began; an exit out of that order is refused.

A entered, B entered, A exited: trio's cancel scopes and anyio's refuse the same misnesting.
The exit of A raises :class:`~pygpukit.ContextError` after ending both sessions, so the
context bound afterwards is the one bound before A — never A, whose charges would otherwise
go on silently — and B's own exit, when it comes, does nothing.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator

import anyio
import pytest

from pygpukit import MB, ContextError, context_session, current_context, current_stream
from pygpukit.runtime import ExecutionContext, Runtime

MISNESTED = (
    r"^context_session\('{outer}'\) exited while sessions entered inside it were still open "
    r"\({inner}\): sessions must end in the reverse order they began \(nest the with blocks; "
    r"close ExitStacks innermost first\)\. All of them are ended now\. An async generator "
    r"that yields inside a session keeps it open in the consumer between items: iterate such "
    r"generators one at a time, or each in a task of its own$"
)


def _array_lib_stream(rt: Runtime) -> int | None:
    """The array library's current stream on this thread (CUDA), else None."""
    if rt.backend.name != "cuda":
        return None
    import cupy

    return int(cupy.cuda.get_current_stream().ptr)


def _pins(ctx: ExecutionContext) -> int:
    return ctx._eviction._busy  # sessions and tasks keeping its buffers on the device


def test_exit_stacks_closed_out_of_order_unbind_both(rt: Runtime) -> None:
    a = rt.create_context("a", max_vram=16 * MB)
    b = rt.create_context("b", max_vram=16 * MB)
    thread_stream = _array_lib_stream(rt)
    first, second = contextlib.ExitStack(), contextlib.ExitStack()
    first.enter_context(context_session(a))
    second.enter_context(context_session(b))
    assert current_context() is b
    with pytest.raises(ContextError, match=MISNESTED.format(outer="a", inner="'b'")):
        first.close()
    assert current_context() is None
    assert current_stream() is None
    assert _array_lib_stream(rt) == thread_stream
    second.close()  # ended already: nothing to do, nothing raised
    assert current_context() is None
    assert (_pins(a), _pins(b)) == (0, 0)
    kept = rt.xp.empty(MB, dtype="uint8")  # outside any session: charged to neither
    assert (a.usage().used, b.usage().used) == (0, 0)
    assert rt.ledger.unscoped.held >= MB
    del kept


def test_the_context_bound_before_the_outer_session_comes_back(host_rt: Runtime) -> None:
    x, a, b, c = (host_rt.create_context(n, max_vram=16 * MB) for n in "xabc")
    with context_session(x):
        sa, sb, sc = context_session(a), context_session(b), context_session(c)
        sa.__enter__()
        sb.__enter__()
        sc.__enter__()
        with pytest.raises(ContextError, match=MISNESTED.format(outer="a", inner="'c', 'b'")):
            sa.__exit__(None, None, None)
        assert current_context() is x
        sb.__exit__(None, None, None)
        sc.__exit__(None, None, None)
        assert current_context() is x
        kept = host_rt.xp.empty(MB, dtype="uint8")
        assert x.usage().used == MB
        assert [_pins(ctx) for ctx in (x, a, b, c)] == [1, 0, 0, 0]
        # the sessions can be entered again, and then nest as usual
        with sb, sc:
            assert current_context() is c
        assert current_context() is x
    assert current_context() is None
    del kept


def test_the_error_keeps_the_exception_that_was_leaving_the_block(host_rt: Runtime) -> None:
    a = host_rt.create_context("a", max_vram=MB)
    b = host_rt.create_context("b", max_vram=MB)
    inner = context_session(b)

    def misnested() -> None:
        with context_session(a):
            inner.__enter__()
            raise KeyError("model weights")

    with pytest.raises(ContextError) as info:
        misnested()
    assert isinstance(info.value.__context__, KeyError)
    inner.__exit__(None, None, None)
    assert current_context() is None


def test_nested_exits_in_order_are_unchanged(host_rt: Runtime) -> None:
    a = host_rt.create_context("a", max_vram=MB)
    b = host_rt.create_context("b", max_vram=MB)
    with contextlib.ExitStack() as stack:
        stack.enter_context(context_session(a))
        stack.enter_context(context_session(b))
        assert current_context() is b
    assert current_context() is None
    with context_session(a), context_session(b), context_session(a):
        assert current_context() is a
    assert current_context() is None


def test_exiting_twice_or_without_entering_is_refused(host_rt: Runtime) -> None:
    a = host_rt.create_context("a", max_vram=MB)
    session = context_session(a)
    with pytest.raises(ContextError, match=r"^this context_session\(\) is not entered"):
        session.__exit__(None, None, None)
    with session:
        pass
    with pytest.raises(ContextError, match=r"^this context_session\(\) is not entered"):
        session.__exit__(None, None, None)
    assert current_context() is None


def test_a_session_exited_on_another_thread_is_refused_and_left_open(host_rt: Runtime) -> None:
    a = host_rt.create_context("a", max_vram=MB)
    session = context_session(a)
    session.__enter__()
    errors: list[BaseException] = []

    def elsewhere() -> None:
        try:
            session.__exit__(None, None, None)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=elsewhere)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], ContextError)
    assert str(errors[0]) == (
        "context_session('a') was entered in another task or thread; exit it in the task "
        "or thread that entered it"
    )
    assert current_context() is a  # still open here, where it can still be exited
    session.__exit__(None, None, None)
    assert current_context() is None
    assert _pins(a) == 0


@pytest.mark.anyio
async def test_async_generators_consumed_alternately_are_refused(rt: Runtime) -> None:
    a = rt.create_context("a", max_vram=16 * MB)
    b = rt.create_context("b", max_vram=16 * MB)
    thread_stream = _array_lib_stream(rt)

    async def tokens(ctx: ExecutionContext) -> AsyncIterator[int]:
        async with context_session(ctx):
            for i in range(2):
                yield i

    ga, gb = tokens(a), tokens(b)
    assert await ga.__anext__() == 0  # a's session opens in this task
    assert await gb.__anext__() == 0  # b's opens inside it
    assert current_context() is b
    assert await ga.__anext__() == 1
    with pytest.raises(ContextError, match=MISNESTED.format(outer="a", inner="'b'")):
        await ga.__anext__()  # a's session ends while b's is open
    assert current_context() is None
    assert await gb.__anext__() == 1
    with pytest.raises(StopAsyncIteration):
        await gb.__anext__()  # b's exit: already ended, nothing raised
    assert current_context() is None
    assert _array_lib_stream(rt) == thread_stream
    assert (_pins(a), _pins(b)) == (0, 0)


@pytest.mark.anyio
async def test_a_session_copied_into_a_child_task_is_not_exited_there(host_rt: Runtime) -> None:
    a = host_rt.create_context("a", max_vram=MB)
    seen: list[object] = []
    async with context_session(a) as _:
        session = context_session(a)
        await session.__aenter__()

        async def child() -> None:
            seen.append(current_context())
            try:
                await session.__aexit__(None, None, None)
            except ContextError as exc:
                seen.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(child)
        assert seen[0] is a and isinstance(seen[1], ContextError)
        assert current_context() is a
        await session.__aexit__(None, None, None)
        assert current_context() is a
    assert current_context() is None
