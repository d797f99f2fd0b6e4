"""``ctx.submit``: running tasks on one launcher thread per context.

The launcher thread runs model code with the context bound once (its stream as the array
library's current stream, its budget charged), so the event loop stays free while the code
launches kernels. The caller is woken by the completion bridge once the GPU work the code
enqueued has run. *When* a task launches is the scheduling policy's decision
(:class:`~pygpukit.runtime.SchedulingPolicy`; the dispatcher by default); this module only
executes what it launches.
"""

from __future__ import annotations

import functools
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import FunctionType
from typing import TYPE_CHECKING, Any

import anyio

from .. import _telemetry
from .._exceptions import ContextClosed, InvalidArgument, InvalidArgumentType, QueueFull
from ._backends._torch import translate
from ._completion import checkpoint
from ._context import ContextState, ExecutionContext, _current
from ._oneshot import Oneshot, running_library
from ._tasks import Task, TaskState
from .checks import check_deadline, check_priority

if TYPE_CHECKING:
    from ._backends import Backend
    from ._batches import Batch
    from ._completion import CompletionBridge
    from ._tasks import PartitionPolicy, SchedulingPolicy
    from ._trace import DeviceClock

__all__ = ("LauncherConfig", "TaskRunner")

_log = logging.getLogger("pygpukit")

HELD_MAX = 32  # tasks that share one completion signal at most (LauncherConfig.batch_us)


@dataclass(frozen=True)
class LauncherConfig:
    """How the runtime executes the tasks its policy launches.

    :ivar inline_us: opt-in (0, the default, turns it off; CUDA only): a task whose
        function's last call took at most this long runs on the event loop thread when its
        context's launcher thread is idle, instead of waking that thread. Such a function
        must not block or wait for the loop, and allocations under memory pressure then
        make room on the loop thread
    :ivar batch_us: tasks of one context that its launcher thread runs back to back
        share one completion signal (CUDA): a finished task's signal waits for the next
        queued task when that task's function took at most this long on the host, and its
        work at most this long on the GPU, on their last call — what each task waited for
        adds to the held task's latency. Up to 32 share a signal (at most
        ``context_in_flight``, as held tasks are in flight); one held while the
        thread is stuck in a function is sent by the completion watchdog at its second
        look. 0 gives every task a signal of its own. Each task is still timed on the GPU
        by itself and resolves only after its own work has run
    """

    inline_us: float = 0.0
    batch_us: float = 50.0

    def __post_init__(self) -> None:
        for name in ("inline_us", "batch_us"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidArgument(
                    f"LauncherConfig.{name} must be a number of microseconds >= 0, not {value!r}"
                )


class _Submitting(threading.local):
    """The task this thread's ``submit()`` is enqueueing, if any."""

    submitting: Task | None = None


def _cost_key(fn: Any) -> Any:
    """What identifies ``fn`` for the inline decision: its code object.

    Code is shared by every closure, lambda or bound method made from one ``def`` (so a
    function made per call is still recognised) and holds no reference to their captured
    objects or ``self`` (so remembering it keeps no model alive). ``None``: no code to go
    by (a builtin, say, or an object whose attributes raise); such a function always goes
    to the launcher thread and never shares a completion signal.
    """
    if type(fn) is FunctionType:  # the common case
        return fn.__code__
    try:
        while isinstance(fn, functools.partial):
            fn = fn.func
        fn = getattr(fn, "__func__", fn)  # a bound method's function
        code = getattr(fn, "__code__", None)
        if code is None:  # a callable object: its class's __call__
            code = getattr(type(fn).__call__, "__code__", None)  # None: C-implemented
    except Exception:
        return None
    return code


_ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _is_async(fn: Any) -> bool:
    """Whether calling ``fn`` makes a coroutine or an async generator, as far as its
    definition tells: a coroutine or async generator function, a partial or bound method
    of one, or an object whose ``__call__`` is one. (A plain function that returns a
    coroutine is caught when it returns: :meth:`_Outcome.run`.)"""
    if type(fn) is FunctionType:  # the common case, read off its code's flags
        return bool(fn.__code__.co_flags & _ASYNC_FLAGS)
    try:
        while isinstance(fn, functools.partial):
            fn = fn.func
        if not inspect.isroutine(fn) and not isinstance(fn, type):
            fn = type(fn).__call__  # a callable object: its class's __call__ tells
        return inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
    except Exception:  # an object whose attributes raise: let the call itself tell
        return False


def _note(table: dict[Any, float], key: Any, value: float) -> None:
    """``table[key] = value`` (the latest call decides), keeping at most 256 keys."""
    if key is not None:
        if len(table) >= 256 and key not in table:
            table.clear()
        table[key] = value


def _on_event_loop() -> bool:
    """Whether this thread is running an asyncio loop or a trio run (not a launcher thread,
    not the completion watchdog)."""
    try:
        running_library()
    except RuntimeError:
        return False
    return True


class _Outcome:
    """What a task's function returned or raised, and whether the task was finished."""

    __slots__ = ("_claimed", "_lock", "error", "ran", "value")

    def __init__(self) -> None:
        self.value: Any = None
        self.error: BaseException | None = None
        self.ran = False
        self._claimed = False
        self._lock = threading.Lock()

    def run(self, task: Task, ctx: ExecutionContext | None = None) -> None:
        token = _current.set(ctx) if ctx is not None else None  # on an executor unit
        try:
            value = task.fn(*task.args, **task.kwargs)
            if isinstance(value, Coroutine):
                # Work that never ran, not a result: fail the task rather than hand back a
                # coroutine nobody awaits. Closed here, it warns of nothing. (Futures, events
                # and other awaitables stand for work already under way: they are results.)
                value.close()
                fn = getattr(task.fn, "__qualname__", None) or repr(task.fn)
                coro = getattr(value, "__qualname__", None) or type(value).__name__
                raise InvalidArgumentType(
                    f"{fn}, submitted to context {task.context.name!r}, returned the coroutine "
                    f"{coro}() instead of a result: submit() runs plain functions on the "
                    "context's launcher thread, where nothing awaits; await async code inside "
                    "'async with context_session(ctx)' instead"
                )
            self.value = value
        except BaseException as exc:
            self.error = translate(exc)  # PyTorch's refusal: the budget error behind it
        finally:
            self.ran = True
            if token is not None:
                _current.reset(token)

    def claim(self) -> bool:
        """``True`` for the first caller only: a task is finished exactly once."""
        with self._lock:
            first, self._claimed = not self._claimed, True
            return first


class _Launcher:
    """One thread per context, running its tasks in the order they launch.

    Where :attr:`DispatcherConfig.inline_us` turns it on, a function already seen to
    return quickly runs right on the event loop thread instead, when nothing of its context
    is waiting for the thread: launching a trivial kernel costs a few microseconds, waking a
    thread and handing it the GIL ten times that (docs/adr/0018). Order is kept: the
    thread is idle, so everything it launched is already on the stream.
    """

    def __init__(self, ctx: ExecutionContext, runner: TaskRunner) -> None:
        self.ctx = ctx
        self.runner = runner
        self.queue: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self.outstanding = 0  # tasks handed to the thread whose fn has not returned yet
        self._costs: dict[Any, float] = {}  # code of fn -> seconds its last call took
        self._gpu_s: dict[Any, float] = {}  # code of fn -> its last task's GPU seconds
        self._events: list[Any] = []  # timing events ready for reuse
        # Decided once: tasks this thread runs may share completion signals (batch_us; the
        # host executor runs tasks as stream items instead)
        self.batching = runner.batch_s > 0 and not runner.backend.tasks_on_streams
        # Tasks that ran on the thread and whose completion signal waits for the tasks
        # after them (DispatcherConfig.batch_us): the bridge's batch they are members of.
        self._batch: Batch | None = None
        self.thread = threading.Thread(
            target=self._run, name=f"pygpukit-launcher-{ctx.name}", daemon=True
        )
        self.thread.start()

    # -- the launcher thread -----------------------------------------------------------
    def put(self, task: Task) -> None:
        with self.runner._lock:
            self.outstanding += 1
        self.queue.put(task)

    def _run(self) -> None:
        ctx = self.ctx
        bridge = self.runner.bridge
        backend = self.runner.backend
        raw = ctx.stream.raw
        _current.set(ctx)  # this thread's own contextvars: allocations charge ctx
        try:
            # once: this thread only ever runs ctx's work; PyTorch's pool is entered for each
            # task instead, so that between tasks its cached memory can be given back
            backend.bind_stream(raw, route=False)
            broken = None
        except BaseException as exc:  # every task then fails with it rather than waits
            broken = exc
        while True:
            task = box = start = None  # hold nothing of the last task while waiting
            task = self._next() if self.batching else self.queue.get()
            if task is None:
                bridge.send(self._batch)  # what it holds, if anything
                return
            box = _Outcome()
            if broken is not None:
                self._finish(task, box, broken, entered=False)
                self._ran()
                continue
            start = self._begin(task, box)
            if start is None:
                self._ran()
                continue
            if not backend.tasks_on_streams:
                routed = backend.route_memory(raw)
                try:
                    self._execute(task, box, start)
                finally:
                    backend.unroute_memory(routed)
                self._ran()  # everything it launched is on the stream: inlining may follow
                continue
            # The host executor's units are its compute: run fn as a stream item, so stream
            # priorities order it as they order kernels on a GPU. A guard right behind the
            # item lets the watchdog fail the task if the device faults before it runs.
            self._ran()
            try:
                raw.launch_host_func(functools.partial(self._execute, task, box, start, ctx))
                bridge.on_done(raw, backend, functools.partial(self._guard, task, box))
            except BaseException as exc:
                self._finish(task, box, exc)

    def _ran(self) -> None:
        with self.runner._lock:
            self.outstanding -= 1

    # -- completion signals shared by tasks launched back to back ----------------------
    def _next(self) -> Task | None:
        """The next task; the held tasks' signal is sent first where it would otherwise
        wait for a blocking ``get`` or for a function not known to be quick."""
        try:
            task = self.queue.get_nowait()
        except queue.Empty:
            self.runner.bridge.send(self._batch)
            task = self.queue.get()
        if task is not None:
            task.cost_key = key = task.cost_key or _cost_key(task.fn)  # _execute learns it
            if not self._quick(key):
                self.runner.bridge.send(self._batch)
        return task

    def _quick(self, key: Any) -> bool:
        """Whether the held tasks may wait for a task of ``key``: its function's last call
        took at most ``batch_s`` on the host and its work at most that on the GPU (what
        holding adds to their latency)."""
        limit = self.runner.batch_s
        host, gpu = self._costs.get(key), self._gpu_s.get(key)
        return host is not None and gpu is not None and host <= limit and gpu <= limit

    # -- on the event loop -------------------------------------------------------------
    def try_inline(self, task: Task) -> bool:
        """Run ``task`` here and now if that is known to be quick and keeps the order."""
        limit = self.runner.inline_s
        cost = self._costs.get(task.cost_key)
        ctx = self.ctx
        if cost is None or cost > limit or self.outstanding or not ctx._eviction.nothing_evicted():
            return False
        backend = self.runner.backend
        box = _Outcome()
        token = backend.bind_stream(ctx.stream.raw)
        try:
            start = self._begin(task, box)
            if start is not None:
                self._execute(task, box, start, ctx)
        finally:
            backend.restore_stream(token)
        return True

    # -- both ---------------------------------------------------------------------------
    def _event(self) -> Any:
        try:
            return self._events.pop()
        except IndexError:
            return self.runner.backend.create_event(timing=True)

    def _begin(self, task: Task, box: _Outcome) -> Any:
        """Mark the task's start on the stream and pin the context; ``None`` if that failed
        (the task is then finished with the error)."""
        try:
            start = self._event()
            self.ctx.stream.raw.record(start)
            self.ctx._eviction.enter()  # pins evictable buffers; restores evicted ones
        except BaseException as exc:  # a closed or faulted stream, a failed restore
            self._finish(task, box, exc, entered=False)
            return None
        return start

    def _execute(
        self, task: Task, box: _Outcome, start: Any, bind: ExecutionContext | None = None
    ) -> None:
        """Run the task, then mark the end of the work it enqueued and await that."""
        runner = self.runner
        held = bind is None and self.batching  # on this thread
        if held or runner.inlines:  # remember how long fn took (try_inline, _next)
            t0 = time.perf_counter()
            box.run(task, bind)
            _note(self._costs, task.cost_key, time.perf_counter() - t0)
        else:
            box.run(task, bind)
        try:
            end = self._event()
            self.ctx.stream.raw.record(end)  # after everything fn enqueued
            # Held with the tasks before it, or for a task queued behind it: a task alone
            # gets its signal right away. The watchdog sends a batch this thread does not.
            batch = self._batch
            if held and ((batch is not None and batch.open) or not self.queue.empty()):
                done = functools.partial(self._done, task, box, start, end)
                self._batch = runner.bridge.hold(batch, end, runner.backend, done, HELD_MAX)
                return
            runner.bridge.on_done(
                end,
                runner.backend,
                functools.partial(self._done, task, box, start, end),
                # only a task run inline by its own submit() call may finish synchronously:
                # one launched by another task's completion would nest the next completion
                # in this one, and so on down the queue
                spin=bind is not None and runner._local.submitting is task,
            )
        except BaseException as exc:  # the device is gone: finish the task now
            self._finish(task, box, box.error or exc)

    def _guard(self, task: Task, box: _Outcome, device_error: BaseException | None) -> None:
        if device_error is not None and not box.ran:
            self._finish(task, box, device_error)

    def _done(
        self, task: Task, box: _Outcome, start: Any, end: Any, device_error: BaseException | None
    ) -> None:
        gpu_ms = 0.0
        if device_error is None:
            try:
                gpu_ms = start.elapsed_ms(end)
                clock = self.runner.device_clock  # set while a trace records (_trace.py)
                if clock is not None:
                    task.t_gpu_start = clock.at(start)
                    task.t_gpu_end = task.t_gpu_start + gpu_ms / 1e3
            except Exception:  # the task is finished all the same, untimed
                gpu_ms = 0.0
            self._events += (start, end)  # both complete: safe to record again
            _note(self._gpu_s, task.cost_key, gpu_ms / 1e3)  # for _quick
        self._finish(task, box, box.error or device_error, gpu_ms=gpu_ms)

    def _finish(
        self,
        task: Task,
        box: _Outcome,
        error: BaseException | None,
        *,
        entered: bool = True,
        gpu_ms: float = 0.0,
    ) -> None:
        if not box.claim():
            return
        ctx = self.ctx
        if entered:
            ctx._eviction.leave()  # its GPU work is over: the buffers may be evicted again
        task.gpu_ms = gpu_ms
        waited = task.t_launched - task.t_queued if task.t_launched else None
        ctx._stats.record_task(gpu_ms, waited, failed=error is not None)
        runner = self.runner
        partitions = runner.partitions
        if ctx.partition is not None and partitions is not None and gpu_ms:
            try:
                partitions.record_gpu_time(ctx.partition, gpu_ms / 1e3)
            except InvalidArgument:  # the partition was deleted meanwhile
                pass
        runner.policy.finished(task, None if error else box.value, error)
        for listener in runner.listeners:
            try:
                listener(task)
            except Exception:
                _log.exception("a task listener raised; the task itself finished")

    def stop(self) -> None:
        self.queue.put(None)

    def finish_launched(self) -> None:
        """Wait (after :meth:`stop`) until every launched task has run, where tasks run as
        stream items: a task launched before its context closed runs after the work queued
        ahead of it, and the stream it may enqueue on must still be open then. The thread
        only enqueues here (no task code runs on it), so joining it cannot wait long."""
        if threading.current_thread() is not self.thread:
            self.thread.join()
        try:
            self.ctx.stream.raw.synchronize()
        except Exception:  # a faulted device: its waiters hear it from the watchdog
            pass


class TaskRunner:
    """A runtime's task execution: ``submit`` hands tasks to the scheduling policy, and
    runs the ones it launches on their contexts' launcher threads.

    :param policy: decides when each task launches
    :param config: how tasks are executed (inline, shared completion signals)
    """

    def __init__(
        self,
        backend: Backend,
        bridge: CompletionBridge,
        policy: SchedulingPolicy,
        config: LauncherConfig,
    ) -> None:
        self.backend = backend
        self.bridge = bridge
        self.policy = policy
        self.partitions: PartitionPolicy | None = None
        self._launchers: dict[ExecutionContext, _Launcher] = {}
        self._lock = threading.Lock()
        self._local = _Submitting()
        self.inline_s = config.inline_us / 1e6
        self.batch_s = config.batch_us / 1e6
        # Decided once: inline execution is on, and the backend runs tasks on launcher
        # threads (the host executor runs them as stream items, never inline).
        self.inlines = self.inline_s > 0 and not backend.tasks_on_streams
        #: ``listener(task)`` is called as each submitted task finishes (timelines, metrics);
        #: it runs on the thread that drains completions, so it must be quick.
        self.listeners: list[Callable[[Task], None]] = []
        #: set while a trace records: turns a task's events into times on the policy's
        #: clock (``Task.t_gpu_start`` / ``t_gpu_end``)
        self.device_clock: DeviceClock | None = None
        policy.bind(self._launch, self._over_share)

    def _over_share(self, task: Task) -> bool:
        part = task.context.partition
        return part is not None and self.partitions is not None and self.partitions.over_share(part)

    def _launch(self, task: Task) -> None:
        ctx = task.context
        if ctx.state is ContextState.CLOSED:  # destroyed between submit() and launch
            ctx._stats.cancelled += 1  # never ran: as a task its destroy_context took out
            self.policy.finished(task, None, ContextClosed(ctx.name))
            return
        launcher = self._launchers.get(ctx)
        if launcher is None:
            with self._lock:
                launcher = self._launchers.get(ctx)
                if launcher is None:
                    launcher = self._launchers[ctx] = _Launcher(ctx, self)
        if self.inlines and _on_event_loop() and launcher.try_inline(task):
            return
        launcher.put(task)

    async def submit(
        self,
        ctx: ExecutionContext,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        priority: int,
        deadline: float | None,
    ) -> Any:
        """Queue ``fn(*args, **kwargs)`` in ``ctx``; return its result once its GPU work ran
        (see :meth:`ExecutionContext.submit`)."""
        if not callable(fn):
            raise InvalidArgumentType(f"submit() needs a callable, not {type(fn).__name__}")
        if _is_async(fn):
            name = getattr(fn, "__qualname__", None) or f"a {type(fn).__name__} object"
            raise InvalidArgumentType(
                f"submit() runs a plain function on the context's launcher thread, and {name} "
                "is async; await it inside 'async with context_session(ctx)' instead"
            )
        priority = check_priority(priority)
        deadline = check_deadline(deadline)
        ctx._check_open()
        self.bridge.attach()
        policy = self.policy
        one = Oneshot()
        task = Task(ctx, ctx.qos, fn, args, kwargs, priority, deadline, one.set)
        if self.inlines:
            task.cost_key = _cost_key(fn)  # once: the launch and the launcher both use it
        tracer = _telemetry.tracer  # read once: another thread may turn spans off
        span = None if tracer is None else _telemetry.start_task_span(tracer, task)
        stats = ctx._stats
        self._local.submitting = task
        try:
            policy.enqueue(task)
        except BaseException as exc:
            stats.queue_full += isinstance(exc, QueueFull)
            if span is not None:
                _telemetry.end_task_span(span, task, exc)
            raise
        finally:
            self._local.submitting = None
        stats.submitted += 1
        try:
            if one.done():  # finished inline: still a scheduling point, as awaits are
                await checkpoint()
            if deadline is None:
                value = await one.wait(again=False)
            else:
                with anyio.move_on_after(max(0.0, deadline - policy.clock())) as scope:
                    value = await one.wait()
                if scope.cancelled_caught:
                    policy.expire(task)  # no-op if it launched meanwhile
                    value = await one.wait()
        except BaseException as exc:
            policy.cancel(task)  # before launch: out of the queue; after: no-op
            # never launched: counted here (a launched task is counted when it finishes)
            stats.cancelled += task.state is TaskState.CANCELLED
            stats.expired += task.state is TaskState.EXPIRED
            if span is not None:
                _telemetry.end_task_span(span, task, exc)
            raise
        if span is not None:
            _telemetry.end_task_span(span, task, None)
        return value

    def context_closed(self, ctx: ExecutionContext) -> None:
        """Fail ``ctx``'s queued tasks and stop its launcher thread (after what it runs)."""
        for task in self.policy.queued():
            if task.context is ctx and self.policy.cancel(task):
                task.deliver(None, ContextClosed(ctx.name))
        with self._lock:
            launcher = self._launchers.pop(ctx, None)
        if launcher is not None:
            launcher.stop()
            if self.backend.tasks_on_streams:
                launcher.finish_launched()
        self.policy.forget(ctx)

    def close(self) -> None:
        with self._lock:
            launchers = list(self._launchers.values())
            self._launchers.clear()
        for launcher in launchers:
            launcher.stop()
