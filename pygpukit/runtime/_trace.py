"""``Runtime.trace``: every submitted task's GPU work as a Chrome / Perfetto trace.

Each task already records an event on its context's stream before its function runs and
one after the work it enqueued (that is how its GPU time is measured). CUDA events say how
far apart two of them are, not when either ran, so a trace starts by recording one *origin*
event on a stream of its own, waiting for it, and reading the policy's clock: from then on
a task's start is the origin's time plus the device time between the two, and its end its
start plus its GPU time (read from its own two events). The times are on the clock the
tasks' queue times are on, so one file shows a task's wait and its GPU work; they read late
by as long as the wait for the origin took to return (microseconds). CUDA reports elapsed
time as a 32-bit float of milliseconds, so a start read far from the origin is coarse —
about 8 µs after 100 s, 0.25 ms after an hour — while each duration stays exact.

Recording costs the launcher two elapsed-time reads per task and the listener one tuple
appended to a bounded buffer; the JSON is built when the trace ends.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from .._exceptions import InvalidArgument, InvalidArgumentType
from ._tasks import Task, TaskState

if TYPE_CHECKING:
    from ._backends import Backend, DeviceInfo
    from ._tasks import SchedulingPolicy


class Runner(Protocol):
    """What a trace needs of the runtime's task runner (``_launcher.TaskRunner``)."""

    device_clock: DeviceClock | None
    listeners: list[Callable[[Task], None]]
    policy: SchedulingPolicy


__all__ = ("DeviceClock", "Trace")


class DeviceClock:
    """When events recorded on the device completed, on ``clock``'s time line."""

    __slots__ = ("_origin", "t0")

    def __init__(self, backend: Backend, clock: Callable[[], float]) -> None:
        least, _greatest = backend.info().priority_range
        stream = backend.create_stream(least)
        try:
            origin = backend.create_event(timing=True)
            stream.record(origin)
            origin.synchronize()
            self.t0 = clock()
        finally:
            stream.close()
        self._origin = origin

    def close(self) -> None:
        self._origin.close()

    def at(self, event: Any) -> float:
        """The time ``event`` (timing, recorded after the origin, complete) completed."""
        return self.t0 + self._origin.elapsed_ms(event) / 1e3


class Trace:
    """Records every task the runtime finishes while it is open (a context manager, from
    :meth:`Runtime.trace`); writes Chrome trace JSON (``chrome://tracing``,
    https://ui.perfetto.dev) to ``path`` when it closes.

    One row per context, named with its tier; one slice per task, from its GPU work's start
    to its end, with its queue wait, GPU time, stream, priority and outcome as arguments.

    :ivar dropped: tasks left out because the buffer was full (the oldest go first)
    """

    def __init__(
        self,
        runner: Runner,
        backend: Backend,
        device: DeviceInfo,
        path: str | Path | None,
        max_tasks: int,
    ) -> None:
        if path is not None and not isinstance(path, str | Path):
            raise InvalidArgumentType(f"trace() takes a file path or None, not {path!r}")
        if not isinstance(max_tasks, int) or isinstance(max_tasks, bool) or max_tasks < 1:
            raise InvalidArgument(
                f"max_tasks must be a positive int, not {max_tasks!r}: the most tasks the "
                "trace keeps (the oldest are dropped beyond it)"
            )
        self._runner = runner
        self._backend = backend
        self._device = device
        self.path = None if path is None else Path(path)
        self._tasks: deque[tuple[Any, ...]] = deque(maxlen=max_tasks)
        self._seen = 0
        self._t0 = 0.0
        self._open = False

    @property
    def dropped(self) -> int:
        return self._seen - len(self._tasks)

    def __enter__(self) -> Trace:
        runner = self._runner
        if runner.device_clock is not None:
            raise InvalidArgument(
                "a trace is already recording on this runtime; end it before starting another"
            )
        runner.device_clock = clock = DeviceClock(self._backend, runner.policy.clock)
        self._t0 = clock.t0
        runner.listeners.append(self._record)
        self._open = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop recording and write the file (if a path was given); idempotent."""
        if not self._open:
            return
        self._open = False
        runner = self._runner
        clock, runner.device_clock = runner.device_clock, None
        runner.listeners.remove(self._record)
        if clock is not None:
            clock.close()
        if self.path is not None:
            self.path.write_text(json.dumps(self.chrome()))

    def _record(self, task: Task) -> None:  # on the thread that finishes tasks
        ctx = task.context
        self._seen += 1
        if task.t_gpu_end:
            start, end = task.t_gpu_start - self._t0, task.t_gpu_end - self._t0
        else:  # no device times (its stream failed): the host's view instead
            start, end = task.t_launched - self._t0, task.t_done - self._t0
        self._tasks.append(
            (
                ctx.name,
                getattr(task.fn, "__qualname__", type(task.fn).__name__),
                start,
                end,
                ctx.qos,
                ctx.stream.id,
                task.priority,
                task.t_launched - task.t_queued,
                task.gpu_ms,
                task.state is TaskState.DONE,
            )
        )

    def chrome(self) -> dict[str, Any]:
        """The trace as a Chrome trace JSON object."""
        device = self._device
        pid = device.device_id
        rows: dict[str, int] = {}
        events: list[dict[str, Any]] = [
            _meta("process_name", pid, 0, f"{device.name} ({device.backend}, device {pid})")
        ]
        for name, fn, start, end, tier, stream, priority, waited, gpu_ms, ok in list(self._tasks):
            tid = rows.get(name)
            if tid is None:
                tid = rows[name] = len(rows) + 1
                events.append(_meta("thread_name", pid, tid, f"{name} ({tier.name})"))
                events.append(_meta("thread_sort_index", pid, tid, tier.rank * 10_000 + tid))
            events.append(
                {
                    "name": fn,
                    "cat": "gpu-task",
                    "ph": "X",
                    "pid": pid,
                    "tid": tid,
                    "ts": round(start * 1e6, 3),
                    "dur": round(max(0.0, end - start) * 1e6, 3),
                    "args": {
                        "context": name,
                        "tier": tier.name,
                        "stream": stream,
                        "priority": priority,
                        "queue_wait_ms": round(waited * 1e3, 4),
                        "gpu_ms": round(gpu_ms, 4),
                        "outcome": "ok" if ok else "failed",
                    },
                }
            )
        return {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {"pygpukit": {"tasks": self._seen, "dropped": self.dropped}},
        }

    @property
    def spans(self) -> list[tuple[str, str, float, float]]:
        """``(context, task, start, end)`` per recorded task, in seconds since the trace
        began (device times where known)."""
        return [task[:4] for task in list(self._tasks)]


def _meta(kind: str, pid: int, tid: int, value: object) -> dict[str, Any]:
    key = "sort_index" if kind.endswith("sort_index") else "name"
    return {"name": kind, "ph": "M", "pid": pid, "tid": tid, "args": {key: value}}
