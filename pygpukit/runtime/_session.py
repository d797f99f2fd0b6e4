"""Sessions: binding an execution context to the calling thread or task.

The binding lives in a :class:`~contextvars.ContextVar`, so each asyncio or trio task (and
each thread) has its own. Allocation routing reads it directly. The array libraries'
"current stream", though, is thread-local: two tasks interleaving on one loop thread would
clobber each other's. So the runtime re-applies the task's stream around *every step* of
every task:

- asyncio / uvloop: a task factory wraps each task's coroutine so that each ``send`` /
  ``throw`` binds the task's stream and restores the thread's afterwards;
- trio: an instrument does the same in ``before_task_step`` / ``after_task_step``.

The task factory is installed on a loop the first time the runtime sees it (initialize()
or a Runtime built in a running loop, create_context, a session entered) and, on Python
< 3.14, on every loop created after :func:`pygpukit.scheduler.initialize` through an event
loop policy wrapper. A task created before its loop was hooked binds its stream at session
entry only; two such tasks may not hold sessions at once on one thread, and the second is
told so (:class:`~pygpukit.ContextError`) rather than silently given the wrong stream.
"""

from __future__ import annotations

import asyncio
import collections.abc
import sys
import threading
import weakref
from collections.abc import Coroutine
from contextvars import ContextVar, Token
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .._exceptions import ContextError, InvalidArgumentType
from .._locks import BookkeepingLock
from ._backends._torch import translate
from ._context import ExecutionContext, _current

if TYPE_CHECKING:
    from ._backends import Backend
    from ._stream import Stream

__all__ = (
    "bind_each_step",
    "context_session",
    "current_context",
    "current_stream",
    "hook_event_loop",
    "hook_running_loop",
    "steps_are_bound",
)

# Backends whose array library has a thread-local current stream (CUDA); the step hooks
# touch only these, so pure host-backend programs pay nothing per step.
_binders: list[Backend] = []


_binders_lock = BookkeepingLock()  # unregistering also runs from finalizers: see _locks


def register_binder(backend: Backend) -> None:
    global _binders
    with _binders_lock:
        if backend.name == "cuda" and not any(b is backend for b in _binders):
            _binders = [*_binders, backend]  # a new list: readers iterate a snapshot


def unregister_binder(backend: Backend) -> None:
    """Stop binding ``backend``'s streams at task steps (its runtime closed or went away):
    every registered backend costs every task step of the process a bind and a restore."""
    global _binders
    with _binders_lock:
        _binders = [b for b in _binders if b is not backend]


def current_context() -> ExecutionContext | None:
    """The context the calling task or thread is in a session of, or ``None``."""
    return _current.get()


def current_stream() -> Stream | None:
    """The stream of :func:`current_context`, or ``None`` outside any session."""
    ctx = _current.get()
    return None if ctx is None else ctx.stream


def _bind(ctx: ExecutionContext | None) -> list[tuple[Backend, object]] | None:
    if not _binders:
        return None
    stream = None if ctx is None else ctx.stream.raw
    own = None if ctx is None else ctx._runtime.backend
    return [(b, b.bind_stream(stream if b is own else None)) for b in _binders]


def _unbind(tokens: list[tuple[Backend, object]] | None) -> None:
    if tokens:
        for backend, token in reversed(tokens):
            backend.restore_stream(token)


# -- asyncio: a coroutine wrapper that binds the task's stream around each step --------
class _BoundCoroutine(collections.abc.Coroutine):  # type: ignore[type-arg]
    __slots__ = ("_coro",)

    def __init__(self, coro: Any) -> None:
        self._coro = coro

    def send(self, value: Any) -> Any:
        if not _binders:
            return self._coro.send(value)
        tokens = _bind(_current.get())
        try:
            return self._coro.send(value)
        finally:
            _unbind(tokens)

    def __next__(self) -> Any:
        return self.send(None)

    def throw(self, *args: Any) -> Any:
        tokens = _bind(_current.get())
        try:
            return self._coro.throw(*args)
        finally:
            _unbind(tokens)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Any:
        return self

    def __getattr__(self, name: str) -> Any:  # cr_frame, cr_running, __qualname__, ...
        return getattr(self._coro, name)

    def __repr__(self) -> str:
        return repr(self._coro)


class _TaskFactory:
    """Wraps each new task's coroutine; chains to a factory that was there before."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> Any:
        if not isinstance(coro, _BoundCoroutine) and asyncio.iscoroutine(coro):
            coro = _BoundCoroutine(coro)
        if self.inner is not None:
            return self.inner(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)


_hooked_loops: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def hook_event_loop(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Install the per-step stream binding on ``loop`` (the running one by default).

    Tasks created afterwards are bound at every step. Idempotent.
    """
    if loop is None:
        loop = asyncio.get_running_loop()
    if loop in _hooked_loops:
        return
    factory = loop.get_task_factory()
    if not isinstance(factory, _TaskFactory):
        loop.set_task_factory(_TaskFactory(factory))
    _hooked_loops.add(loop)


def hook_running_loop() -> None:
    """Hook the running asyncio loop or trio run, if there is one."""
    loop = asyncio._get_running_loop()
    if loop is not None:
        hook_event_loop(loop)
    elif "trio" in sys.modules:
        _hook_trio()


class _LoopHookingPolicy(asyncio.AbstractEventLoopPolicy):
    """Delegates to the policy it replaces; hooks every loop that policy creates."""

    def __init__(self, inner: asyncio.AbstractEventLoopPolicy) -> None:
        self.inner = inner

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = self.inner.new_event_loop()
        hook_event_loop(loop)
        return loop

    def get_event_loop(self) -> asyncio.AbstractEventLoop:
        return self.inner.get_event_loop()

    def set_event_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.inner.set_event_loop(loop)

    def __getattr__(self, name: str) -> Any:  # get_child_watcher & co on 3.11/3.12
        return getattr(self.inner, name)


def hook_future_loops() -> None:
    """Hook loops that ``asyncio.run`` and friends create from now on (Python < 3.14)."""
    if sys.version_info >= (3, 14):  # policies are deprecated there
        return
    policy = asyncio.get_event_loop_policy()
    if not isinstance(policy, _LoopHookingPolicy):
        asyncio.set_event_loop_policy(_LoopHookingPolicy(policy))  # type: ignore[abstract]


# -- trio: an instrument ----------------------------------------------------------------
class _TrioBinder:  # a trio.abc.Instrument by duck typing (trio is optional)
    def __init__(self) -> None:
        self._tokens: dict[int, Any] = {}

    def before_task_step(self, task: Any) -> None:
        if _binders:
            self._tokens[id(task)] = _bind(task.context.get(_current))

    def after_task_step(self, task: Any) -> None:
        _unbind(self._tokens.pop(id(task), None))


_trio_var: Any = None


def _hook_trio() -> None:
    global _trio_var
    import trio

    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        return
    if _trio_var is None:
        _trio_var = trio.lowlevel.RunVar("pygpukit_binder")
    if _trio_var.get(None) is None:
        instrument = _TrioBinder()
        trio.lowlevel.add_instrument(instrument)  # type: ignore[arg-type]
        _trio_var.set(instrument)
        # We are inside a task step that began before the instrument existed: save the
        # thread's binding now so that this step's after_task_step restores it.
        instrument.before_task_step(trio.lowlevel.current_task())


# -- sessions ---------------------------------------------------------------------------
_unhooked = threading.local()  # which unhooked task holds a thread-level binding


def bind_each_step(coro: Coroutine[Any, Any, Any]) -> Coroutine[Any, Any, Any]:
    """``coro`` wrapped so that each of its steps binds the stream of the session current
    in the context it runs in, as the tasks of a hooked loop do. For code that drives a
    coroutine itself (the pipeline runs stages in copies of the caller's context)."""
    return _BoundCoroutine(coro)


def steps_are_bound() -> bool:
    """Whether the calling task re-binds its stream at every step, so that it may hold
    sessions while other tasks on its thread hold theirs: ``True`` when no CUDA runtime
    binds streams, in trio (instrumented), on plain threads, and for asyncio tasks created
    after their loop was hooked; ``False`` for an asyncio task created before."""
    return not _binders or _current_task_is_hooked()[0]


def _current_task_is_hooked() -> tuple[bool, object | None]:
    loop = asyncio._get_running_loop()
    if loop is None:
        return True, None  # trio (instrumented) or plain threads
    task = asyncio.current_task(loop)
    if task is None:
        return True, None
    return isinstance(task.get_coro(), _BoundCoroutine), task


# The innermost session entered and not yet exited in this task or thread; each session
# links to the one it was entered inside, so an exit can tell whether it is the innermost.
_innermost: ContextVar[context_session | None] = ContextVar("pygpukit_session", default=None)


class context_session:
    """Run the enclosed code in ``ctx``: its stream is current, its budget is charged.

    Works as ``with`` (a thread) and ``async with`` (the calling task only). Sessions
    nest; the innermost wins. They end in the reverse order they began, as ``with``
    blocks do: exiting a session while one entered inside it is still open raises
    :class:`~pygpukit.ContextError` — after ending both, so that the context bound
    afterwards is the one bound before the outer session began (and the inner session's
    own exit, when it comes, does nothing), as trio ends a misnested cancel scope.
    """

    __slots__ = ("_abandoned", "_ctx", "_held_thread", "_outer", "_token", "_tokens", "_top")

    def __init__(self, ctx: ExecutionContext) -> None:
        if not isinstance(ctx, ExecutionContext):
            raise InvalidArgumentType(
                f"context_session() takes an ExecutionContext, not {type(ctx).__name__}; "
                "create one with create_context(name, max_vram=...)"
            )
        self._ctx = ctx
        self._token: Token[ExecutionContext | None] | None = None
        self._top: Token[context_session | None] | None = None
        self._outer: context_session | None = None
        self._tokens: list[tuple[Backend, object]] | None = None
        self._held_thread = False
        self._abandoned = False

    def __enter__(self) -> ExecutionContext:
        if self._token is not None:
            raise ContextError("this context_session() is already entered; make a new one")
        self._ctx._check_open()
        self._ctx._eviction.enter()  # pins its evictable buffers, restores evicted ones
        self._abandoned = False
        self._token = _current.set(self._ctx)
        self._outer = _innermost.get()
        self._top = _innermost.set(self)
        self._tokens = _bind(self._ctx)
        self._ctx._stats.sessions += 1
        return self._ctx

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is None:
            if self._abandoned:  # ended by its outer session's exit, which raised for it
                self._abandoned = False
                return
            raise ContextError("this context_session() is not entered; exit it only once")
        inner: list[context_session] = []  # still open inside this one, innermost first
        session = _innermost.get()
        while session is not None and session is not self:
            inner.append(session)
            session = session._outer
        if session is not None:
            try:
                # The context bound before this session began, whatever was entered since.
                _current.reset(self._token)
            except ValueError:  # a token of another task's context (that task's copy)
                session = None
        if session is None:  # not open here: entered in another task or thread
            raise ContextError(
                f"context_session({self._ctx.name!r}) was entered in another task or thread; "
                "exit it in the task or thread that entered it"
            )
        for session in inner:
            session._end(abandoned=True)
        self._end(abandoned=False)
        if exc is not None:
            error = translate(exc)  # PyTorch's refusal: the budget error behind it
            if error is not exc:
                raise error
        if inner:
            names = ", ".join(repr(s._ctx.name) for s in inner)
            raise ContextError(
                f"context_session({self._ctx.name!r}) exited while sessions entered inside it "
                f"were still open ({names}): sessions must end in the reverse order they began "
                "(nest the with blocks; close ExitStacks innermost first). All of them are "
                "ended now. An async generator that yields inside a session keeps it open in "
                "the consumer between items: iterate such generators one at a time, or each in "
                "a task of its own"
            )

    def _end(self, *, abandoned: bool) -> None:
        """Everything but the context variable's reset: the stream binding, the
        innermost-session link, the eviction pin, the hold on an unhooked thread."""
        _unbind(self._tokens)
        self._tokens = None
        if not abandoned:
            assert self._top is not None
            _innermost.reset(self._top)
        self._token = self._top = self._outer = None
        self._abandoned = abandoned
        self._ctx._eviction.leave()
        if self._held_thread:
            _unhooked.task = None
            self._held_thread = False

    async def __aenter__(self) -> ExecutionContext:
        hook_running_loop()
        hooked, task = _current_task_is_hooked()
        if not hooked and _binders:
            holder = getattr(_unhooked, "task", None)
            if holder is not None and holder is not task:
                raise ContextError(
                    "two tasks created before pygpukit hooked this event loop hold sessions "
                    "at once, so their CUDA streams would clobber each other; call "
                    "pygpukit.scheduler.initialize() (or pygpukit.hook_event_loop()) before "
                    "creating the tasks"
                )
            if holder is None:  # a nested session of the holder leaves the hold to the outer
                _unhooked.task = task
                self._held_thread = True
        try:
            return self.__enter__()
        except BaseException:
            if self._held_thread:
                _unhooked.task = None
                self._held_thread = False
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)
