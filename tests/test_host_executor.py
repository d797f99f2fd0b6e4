"""The host backend is a real executor: priorities, in-order streams, events."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from pygpukit.runtime import Runtime


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
