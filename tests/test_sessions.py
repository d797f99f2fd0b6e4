"""Per-task binding: interleaved tasks see their own context, stream and budget."""

from __future__ import annotations

import threading

import anyio
import anyio.lowlevel
import pytest
from conftest import CUDA

from pygpukit import MB, context_session, current_context, current_stream
from pygpukit.runtime import ExecutionContext, Runtime

pytestmark = pytest.mark.anyio


def _array_lib_stream(rt: Runtime) -> int | None:
    """The array library's current stream on this thread (CUDA), else None."""
    if rt.backend.name != "cuda":
        return None
    import cupy

    return int(cupy.cuda.get_current_stream().ptr)


async def test_interleaved_tasks_see_their_own_context_stream_and_budget(rt: Runtime) -> None:
    a = rt.create_context("a", max_vram=64 * MB)
    b = rt.create_context("b", max_vram=64 * MB)
    log: list[str] = []
    kept: dict[str, list[object]] = {"a": [], "b": []}
    sizes = {"a": 4096, "b": 8192}

    async def worker(ctx) -> None:  # type: ignore[no-untyped-def]
        async with context_session(ctx):
            for _ in range(25):
                assert current_context() is ctx
                assert current_stream() is ctx.stream
                if rt.backend.name == "cuda":
                    assert _array_lib_stream(rt) == ctx.stream.id
                kept[ctx.name].append(rt.xp.empty(sizes[ctx.name], dtype="uint8"))
                log.append(ctx.name)
                ctx.stream.launch_host_func(lambda: None)
                await ctx.stream  # a real GPU wait: the other task runs meanwhile
                await anyio.lowlevel.checkpoint()
        assert current_context() is None

    async with anyio.create_task_group() as tg:
        tg.start_soon(worker, a)
        tg.start_soon(worker, b)
    switches = sum(1 for x, y in zip(log, log[1:], strict=False) if x != y)
    assert switches >= 10, f"tasks did not interleave: {log}"
    assert a.usage().used == 25 * 4096
    assert b.usage().used == 25 * 8192
    kept.clear()
    assert a.usage().used == 0
    assert b.usage().used == 0


async def test_session_does_not_leak_into_a_sibling_task(rt: Runtime) -> None:
    a = rt.create_context("a", max_vram=16 * MB)
    seen: list[object] = []
    entered = anyio.Event()
    release = anyio.Event()

    async def holder() -> None:
        async with context_session(a):
            entered.set()
            await release.wait()

    async def outsider() -> None:
        await entered.wait()
        seen.append(current_context())
        if rt.backend.name == "cuda":
            seen.append(_array_lib_stream(rt) == a.stream.id)
        release.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        tg.start_soon(outsider)
    assert seen[0] is None
    if rt.backend.name == "cuda":
        assert seen[1] is False


def test_sync_session_is_per_thread(rt: Runtime) -> None:
    a = rt.create_context("a", max_vram=16 * MB)
    other: list[object] = []
    with context_session(a) as ctx:
        assert ctx is a
        assert current_context() is a
        t = threading.Thread(target=lambda: other.append(current_context()))
        t.start()
        t.join()
        with context_session(rt.create_context("inner", max_vram=MB)) as inner:
            assert current_context() is inner
        assert current_context() is a
    assert other == [None]
    assert current_context() is None


def test_allocations_outside_sessions_are_unscoped(rt: Runtime) -> None:
    a = rt.create_context("a", max_vram=16 * MB)
    before = rt._unscoped.used_bytes()
    x = rt.xp.empty(1 << 20, dtype="uint8")
    assert a.usage().used == 0
    assert rt._unscoped.used_bytes() == before + (1 << 20)  # charged outside any context
    del x
    assert rt._unscoped.used_bytes() == before


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_a_closed_runtime_stops_binding_at_every_task_step() -> None:
    from pygpukit.runtime import _session

    def bound(backend: object) -> bool:
        return any(b is backend for b in _session._binders)

    rt = Runtime(backend="cuda", vram_limit=64 * MB)
    backend = rt.backend
    assert bound(backend)
    rt.close()
    assert not bound(backend)  # it would cost every later task step a bind and a restore


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA GPU")
def test_a_nested_session_keeps_an_unhooked_tasks_hold_on_the_thread() -> None:
    """A task created before its loop was hooked binds its stream for the whole thread while
    it holds a session, so a second such task is refused one meanwhile. Leaving a nested
    session of the first task must not give up that hold."""
    import asyncio

    from pygpukit import ContextError

    async def main() -> list[str]:
        go = asyncio.Event()
        contexts: list[ExecutionContext] = []
        outcome: list[str] = []

        async def other() -> None:
            await go.wait()
            try:
                async with context_session(contexts[1]):
                    outcome.append("entered")
            except ContextError:
                outcome.append("refused")

        late = asyncio.get_running_loop().create_task(other())  # before the loop is hooked
        with Runtime(backend="cuda", vram_limit=64 * MB) as rt:  # hooks the running loop
            contexts += [rt.create_context(n, max_vram=MB) for n in ("a", "b")]
            async with context_session(contexts[0]):
                async with context_session(contexts[0]):  # nested, in the same task
                    pass
                go.set()
                await late  # the other task asks while this one still holds
        return outcome

    loop = asyncio.SelectorEventLoop()  # made directly, not through a hooking policy
    try:
        assert loop.run_until_complete(main()) == ["refused"]
    finally:
        loop.close()
