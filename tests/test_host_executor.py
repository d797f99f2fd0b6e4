"""The host backend is a real executor: priorities, in-order streams, events."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from pygpukit.runtime import Event, Runtime


@pytest.fixture
def one_unit(monkeypatch: pytest.MonkeyPatch) -> Iterator[Runtime]:
    monkeypatch.setenv("PYGPUKIT_HOST_WORKERS", "1")
    with Runtime(backend="host") as rt:
        yield rt


def test_highest_priority_ready_stream_runs_first(one_unit: Runtime) -> None:
    rt = one_unit
    blocker = rt.create_stream(priority=0)
    low = rt.create_stream(priority=0)
    high = rt.create_stream(priority=-5)
    gate = threading.Event()
    order: list[str] = []
    blocker.launch_host_func(lambda: gate.wait(5))
    for i in range(3):
        low.launch_host_func(lambda i=i: order.append(f"low{i}"))
    for i in range(3):
        high.launch_host_func(lambda i=i: order.append(f"high{i}"))
    gate.set()
    low.synchronize()
    high.synchronize()
    assert order == ["high0", "high1", "high2", "low0", "low1", "low2"]


def test_streams_run_in_order_and_equal_priorities_share(one_unit: Runtime) -> None:
    rt = one_unit
    a, b = rt.create_stream(), rt.create_stream()
    gate = threading.Event()
    order: list[str] = []
    a.launch_host_func(lambda: gate.wait(5))
    for i in range(3):
        a.launch_host_func(lambda i=i: order.append(f"a{i}"))
        b.launch_host_func(lambda i=i: order.append(f"b{i}"))
    gate.set()
    a.synchronize()
    b.synchronize()
    assert [x for x in order if x[0] == "a"] == ["a0", "a1", "a2"]
    assert [x for x in order if x[0] == "b"] == ["b0", "b1", "b2"]
    # equal priorities take turns (oldest-ready first): no stream runs twice in a row
    assert all(x[0] != y[0] for x, y in zip(order, order[1:], strict=False)), order


def test_wait_event_orders_work_across_streams(host_rt: Runtime) -> None:
    producer, consumer = host_rt.create_stream(), host_rt.create_stream()
    data: list[int] = []
    seen: list[list[int]] = []
    producer.launch_host_func(lambda: (time.sleep(0.05), data.append(42)))
    event = producer.record()
    consumer.wait_event(event)
    consumer.launch_host_func(lambda: seen.append(list(data)))
    consumer.synchronize()
    assert seen == [[42]]
    assert event.query()


def test_event_timing(host_rt: Runtime) -> None:
    s = host_rt.create_stream()
    start, end = host_rt.create_event(timing=True), host_rt.create_event(timing=True)
    s.record(start)
    s.launch_host_func(lambda: time.sleep(0.03))
    s.record(end)
    end.synchronize()
    assert 25 <= start.elapsed_time(end) < 1000


def test_memory_is_charged_against_the_configured_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYGPUKIT_HOST_VRAM", "64MiB")
    with Runtime(backend="host") as rt:
        assert rt.device.total_memory == 64 << 20
        free_before, _ = rt.backend.mem_get_info()
        x = rt.xp.empty(1 << 20, dtype="uint8")
        assert rt.backend.mem_get_info()[0] == free_before - (1 << 20)
        del x
        assert rt.backend.mem_get_info()[0] == free_before


def test_device_memory_past_the_capacity_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYGPUKIT_HOST_VRAM", "4MiB")
    with Runtime(backend="host") as rt:
        free, total = rt.backend.mem_get_info()
        held = rt.backend.alloc_raw(free)
        assert rt.backend.mem_get_info() == (0, total)
        with pytest.raises(
            MemoryError,
            match=rf"^host device memory exhausted: 512 bytes asked, 0 free of {total}$",
        ):
            rt.backend.alloc_raw(512)
        assert rt.backend.mem_get_info() == (0, total)  # the refusal took nothing
        del held
        assert rt.backend.mem_get_info() == (free, total)
        assert rt.backend.alloc_raw(free) is not None


def test_streams_and_events_are_made_by_the_runtime_and_closed_once(host_rt: Runtime) -> None:
    from pygpukit import InvalidArgument
    from pygpukit.runtime import Event, HandleState, Stream

    stream = host_rt.create_stream(priority=-2)
    event = stream.record()
    assert repr(stream) == f"<Stream id={stream.id:#x} priority=-2 backend=host state=open>"
    assert repr(event) == f"<Event id={event.id:#x} backend=host state=open>"
    assert stream.ptr == stream.id == stream.raw.handle
    for handle in (stream, event):
        with pytest.raises(AttributeError):
            handle.extra = 1  # type: ignore[union-attr]  # slots: nothing else to set
    with pytest.raises(TypeError, match=r"^Stream objects cannot be instantiated directly; use "):
        Stream()
    with pytest.raises(TypeError, match=r"^Event objects cannot be instantiated directly; use "):
        Event()

    event.close()
    event.close()  # idempotent
    assert event.state is HandleState.CLOSED
    assert repr(event).endswith("state=closed>")
    with pytest.raises(InvalidArgument, match=r"^<Event id=.* state=closed> is closed; record a "):
        event.query()
    with pytest.raises(InvalidArgument, match=r"is closed; record a new event$"):
        stream.record(event)
    stream.close()
    stream.close()
    assert stream.state is HandleState.CLOSED
    with pytest.raises(InvalidArgument, match=r"^<Stream id=.* state=closed> is closed; use an "):
        stream.launch_host_func(lambda: None)
    assert stream.query()  # its work has run: a closed stream still answers that


def test_work_an_item_enqueues_on_its_stream_runs_right_behind_it(one_unit: Runtime) -> None:
    stream = one_unit.create_stream()
    gate = threading.Event()
    order: list[str] = []

    def first() -> None:
        gate.wait(5)
        order.append("first")
        stream.launch_host_func(lambda: order.append("nested-1"))
        stream.launch_host_func(lambda: order.append("nested-2"))

    stream.launch_host_func(first)
    stream.launch_host_func(lambda: order.append("queued-behind"))  # before first() runs
    gate.set()
    stream.synchronize()
    assert order == ["first", "nested-1", "nested-2", "queued-behind"]


def test_an_event_recorded_by_an_item_completes_before_the_items_behind_it(
    one_unit: Runtime,
) -> None:
    stream = one_unit.create_stream()
    gate = threading.Event()
    recorded: list[Event] = []
    seen_done: list[bool] = []

    def first() -> None:
        gate.wait(5)
        recorded.append(stream.record())

    stream.launch_host_func(first)
    stream.launch_host_func(lambda: seen_done.append(recorded[0].done))
    gate.set()
    stream.synchronize()
    assert seen_done == [True]
