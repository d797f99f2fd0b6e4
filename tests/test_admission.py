"""QosPolicyEvaluator: the tiers' admission rules, reservations and their invariant."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pygpukit._exceptions import InvalidArgument
from pygpukit.qos._admission import (
    AdmissionAction,
    QosEvaluation,
    QosPolicyEvaluator,
    QosTaskMeta,
)
from pygpukit.runtime._tiers import QoSPolicy

MiB = 1024**2
GiB = 1024**3


def test_seed_snippet() -> None:
    evaluator = QosPolicyEvaluator(total_memory=8 * 1024**3, total_bandwidth=1.0)
    task = QosTaskMeta.guaranteed("inference-1", "LLM Inference", 256 * 1024 * 1024)
    result = evaluator.evaluate(task)
    assert result == QosEvaluation(
        admitted=True,
        action=AdmissionAction.ADMIT,
        priority=0,
        reason="256 MiB and bandwidth 0 reserved",
        reserved_memory=256 * MiB,
        reserved_bandwidth=0.0,
    )
    # evaluate() is pure: nothing was reserved
    assert evaluator.reserved_memory == 0
    assert evaluator.admitted_ids() == ()


def test_priorities_by_tier() -> None:
    ev = QosPolicyEvaluator(GiB)
    assert ev.evaluate(QosTaskMeta.guaranteed("g", "g", MiB)).priority == 0
    assert ev.evaluate(QosTaskMeta.burstable("b", "b", MiB)).priority == 1
    assert ev.evaluate(QosTaskMeta.best_effort("e", "e", MiB)).priority == 2
    # the rank is set even when the task is refused
    assert ev.evaluate(QosTaskMeta.guaranteed("big", "big", 2 * GiB)).priority == 0


def test_guaranteed_reserves_and_rejects_what_does_not_fit() -> None:
    ev = QosPolicyEvaluator(8 * GiB)
    r = ev.admit(QosTaskMeta.guaranteed("a", "A", 8 * GiB - 100 * MiB, bandwidth=0.75))
    assert (r.admitted, r.action, r.reserved_memory, r.reserved_bandwidth) == (
        True,
        AdmissionAction.ADMIT,
        8 * GiB - 100 * MiB,
        0.75,
    )
    assert ev.reserved_memory == 8 * GiB - 100 * MiB
    assert ev.available_memory == 100 * MiB
    assert ev.available_bandwidth == 0.25

    r = ev.admit(QosTaskMeta.guaranteed("b", "B", 256 * MiB))
    assert (r.admitted, r.action, r.reserved_memory) == (False, AdmissionAction.REJECT, 0)
    assert r.reason == (
        "needs 256 MiB reserved but only 100 MiB of 8 GiB is unreserved; "
        "release other reservations or ask for less"
    )
    r = ev.admit(QosTaskMeta.guaranteed("c", "C", MiB, bandwidth=0.5))
    assert r.reason == (
        "needs bandwidth 0.5 reserved but only 0.25 of 1 is unreserved; "
        "release other reservations or ask for less"
    )
    r = ev.admit(QosTaskMeta.guaranteed("d", "D", GiB, bandwidth=0.5))
    assert r.reason.startswith(
        "needs 1 GiB reserved but only 100 MiB of 8 GiB is unreserved and bandwidth 0.5 reserved"
    )
    assert ev.admitted_ids() == ("a",)
    assert ev.reserved_memory == 8 * GiB - 100 * MiB


def test_exact_fit_is_admitted() -> None:
    ev = QosPolicyEvaluator(GiB)
    assert ev.admit(QosTaskMeta.guaranteed("a", "a", GiB, bandwidth=1.0)).admitted
    assert (ev.available_memory, ev.available_bandwidth) == (0, 0.0)
    assert not ev.admit(QosTaskMeta.guaranteed("b", "b", 1)).admitted
    assert ev.admit(QosTaskMeta.guaranteed("c", "c", 0)).admitted


def test_burstable_admit_throttle_reject() -> None:
    ev = QosPolicyEvaluator(4 * GiB)
    r = ev.admit(QosTaskMeta.burstable("b1", "tts", GiB, burst_memory=GiB, bandwidth=0.25))
    assert (r.admitted, r.action, r.priority) == (True, AdmissionAction.ADMIT, 1)
    assert ev.reserved_memory == GiB  # only the base is reserved
    assert ev.reserved_bandwidth == 0.25

    # base 1 GiB fits the 3 GiB unreserved, base + burst = 4 GiB does not
    r = ev.admit(QosTaskMeta.burstable("b2", "asr", GiB, burst_memory=3 * GiB))
    assert (r.admitted, r.action, r.reserved_memory) == (True, AdmissionAction.THROTTLE, GiB)
    assert r.reason == (
        "1 GiB and bandwidth 0 reserved as its base; its burst to 4 GiB exceeds the 3 GiB "
        "unreserved, so its bursts will be throttled"
    )
    assert ev.reserved_memory == 2 * GiB

    r = ev.admit(QosTaskMeta.burstable("b3", "big", 3 * GiB))
    assert (r.admitted, r.action) == (False, AdmissionAction.REJECT)
    assert r.reason == (
        "needs 3 GiB reserved as its base but only 2 GiB of 4 GiB is unreserved; "
        "release other reservations or ask for less"
    )
    assert ev.admitted_ids() == ("b1", "b2")


def test_best_effort_reserves_nothing_and_queues() -> None:
    ev = QosPolicyEvaluator(4 * GiB)
    ev.admit(QosTaskMeta.guaranteed("g", "g", 2 * GiB))
    r = ev.admit(QosTaskMeta.best_effort("e1", "bg", GiB, bandwidth=0.5))
    assert (r.admitted, r.action, r.priority) == (True, AdmissionAction.ADMIT, 2)
    assert (r.reserved_memory, r.reserved_bandwidth) == (0, 0.0)
    assert (ev.reserved_memory, ev.reserved_bandwidth, ev.best_effort_memory) == (2 * GiB, 0, GiB)

    # 2 GiB unreserved, 1 GiB of it in use by e1: 1.5 GiB must wait
    r = ev.admit(QosTaskMeta.best_effort("e2", "bg2", 1536 * MiB))
    assert (r.admitted, r.action, r.reserved_memory) == (False, AdmissionAction.QUEUE, 0)
    assert r.reason == (
        "needs 1.50 GiB of spare memory but only 1 GiB is spare (2 GiB unreserved, 1 GiB in "
        "use by best-effort tasks); try again after a release"
    )
    ev.release("e1")
    assert ev.admit(QosTaskMeta.best_effort("e2", "bg2", 1536 * MiB)).admitted


def test_best_effort_use_does_not_block_reservations() -> None:
    ev = QosPolicyEvaluator(2 * GiB)
    assert ev.admit(QosTaskMeta.best_effort("e", "e", 2 * GiB)).admitted
    # best-effort memory is evictable, so a guaranteed reservation still fits
    assert ev.admit(QosTaskMeta.guaranteed("g", "g", 2 * GiB)).admitted
    assert ev.reserved_memory == 2 * GiB


def test_release_and_double_release() -> None:
    ev = QosPolicyEvaluator(GiB)
    ev.admit(QosTaskMeta.guaranteed("a", "a", 512 * MiB, bandwidth=0.1))
    ev.admit(QosTaskMeta.burstable("b", "b", 256 * MiB, bandwidth=0.2))
    ev.release("a")
    assert ev.admitted_ids() == ("b",)
    assert (ev.reserved_memory, ev.reserved_bandwidth) == (256 * MiB, 0.2)
    with pytest.raises(
        InvalidArgument,
        match=r"^no admitted task has id 'a'; release\(\) each admitted task exactly once$",
    ):
        ev.release("a")
    with pytest.raises(InvalidArgument, match=r"^no admitted task has id 'zzz'; "):
        ev.release("zzz")
    ev.release("b")
    assert (ev.reserved_memory, ev.reserved_bandwidth) == (0, 0.0)


def test_duplicate_id_rejected() -> None:
    ev = QosPolicyEvaluator(GiB)
    ev.admit(QosTaskMeta.best_effort("t", "t", MiB))
    r = ev.admit(QosTaskMeta.guaranteed("t", "other", MiB))
    assert (r.admitted, r.action) == (False, AdmissionAction.REJECT)
    assert r.reason == "task id 't' is already admitted; release('t') it first or use a unique id"
    assert ev.evaluate(QosTaskMeta.guaranteed("t", "other", MiB)).action is AdmissionAction.REJECT
    assert ev.reserved_memory == 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: QosTaskMeta.guaranteed("", "n", 1),
            r"^task id must be a non-empty str, got ''; pass a name$",
        ),
        (
            lambda: QosTaskMeta.guaranteed("i", None, 1),  # type: ignore[arg-type]
            r"^task name must be a non-empty str, got None; pass a name$",
        ),
        (
            lambda: QosTaskMeta.guaranteed("i", "n", -1),
            r"^memory must be an int number of bytes >= 0, got -1; pass e\.g\. 256 \* MB$",
        ),
        (
            lambda: QosTaskMeta.guaranteed("i", "n", True),
            r"^memory must be an int number of bytes >= 0, got True; pass e\.g\. 256 \* MB$",
        ),
        (
            lambda: QosTaskMeta.guaranteed("i", "n", 1.5),  # type: ignore[arg-type]
            r"^memory must be an int number of bytes >= 0, got 1\.5; ",
        ),
        (
            lambda: QosTaskMeta.burstable("i", "n", 1, burst_memory=-5),
            r"^burst_memory must be an int number of bytes >= 0, got -5; ",
        ),
        (
            lambda: QosTaskMeta.guaranteed("i", "n", 1, bandwidth=1.5),
            r"^bandwidth must be a fraction of the device between 0\.0 and 1\.0, got 1\.5$",
        ),
        (
            lambda: QosTaskMeta.best_effort("i", "n", 1, bandwidth=-0.1),
            r"^bandwidth must be a fraction of the device between 0\.0 and 1\.0, got -0\.1$",
        ),
        (
            lambda: QosTaskMeta("i", "n", QoSPolicy.GUARANTEED, 1, burst_memory=1),
            r"^burst_memory is only for Burstable tasks, got 1 on a guaranteed task; "
            r"use QosTaskMeta\.burstable\(\)$",
        ),
        (
            lambda: QosTaskMeta("i", "n", "guaranteed", 1),  # type: ignore[arg-type]
            r"^tier must be a QoSPolicy, got 'guaranteed'$",
        ),
        (
            lambda: QosPolicyEvaluator(0),
            r"^total_memory must be an int number of bytes > 0, got 0$",
        ),
        (
            lambda: QosPolicyEvaluator(GiB, total_bandwidth=float("nan")),
            r"^total_bandwidth must be a finite number > 0 \(1\.0 = the whole device\), got nan$",
        ),
        (
            lambda: QosPolicyEvaluator(GiB).evaluate("task"),  # type: ignore[arg-type]
            r"^expected a QosTaskMeta, got 'task'; ",
        ),
    ],
)
def test_validation(make: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        make()


def test_task_meta_is_frozen_and_builders_set_tier() -> None:
    t = QosTaskMeta.burstable("i", "n", 10, burst_memory=5, bandwidth=0.5)
    assert t == QosTaskMeta("i", "n", QoSPolicy.BURSTABLE, 10, 5, 0.5)
    assert QosTaskMeta.best_effort("i", "n", 1).tier is QoSPolicy.BEST_EFFORT
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.memory = 0  # type: ignore[misc]


def test_repr_shows_state() -> None:
    ev = QosPolicyEvaluator(8 * GiB)
    ev.admit(QosTaskMeta.guaranteed("a", "a", 2 * GiB, bandwidth=0.5))
    ev.admit(QosTaskMeta.best_effort("b", "b", 512 * MiB))
    assert repr(ev) == (
        "<QosPolicyEvaluator reserved=2 GiB/8 GiB bandwidth=0.5/1 best_effort=512 MiB tasks=2>"
    )


def test_concurrent_admits_never_overcommit() -> None:
    ev = QosPolicyEvaluator(100 * MiB)
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def worker(n: int) -> None:
        barrier.wait()
        for i in range(50):
            r = ev.admit(QosTaskMeta.guaranteed(f"{n}-{i}", "t", MiB, bandwidth=0.01))
            results.append(r.admitted)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 100
    assert (ev.reserved_memory, ev.available_memory) == (100 * MiB, 0)
    assert ev.reserved_bandwidth <= 1.0


_tasks = st.builds(
    lambda tier, i, mem, burst, bw: (
        QosTaskMeta.burstable(f"t{i}", "n", mem, burst, bw)
        if tier is QoSPolicy.BURSTABLE
        else QosTaskMeta(f"t{i}", "n", tier, mem, 0, bw)
    ),
    st.sampled_from(QoSPolicy),
    st.integers(0, 11),
    st.integers(0, 1200),
    st.integers(0, 1200),
    st.floats(0.0, 1.0, allow_nan=False) | st.sampled_from([0.1, 0.2, 0.3, 0.7, 1.0]),
)
_ops = st.lists(st.tuples(st.booleans(), _tasks, st.integers(0, 11)), max_size=60)


@settings(max_examples=300, database=None, deadline=None)
@given(ops=_ops, total_bw=st.sampled_from([1.0, 0.5, 0.3]))
def test_reservations_never_exceed_totals(
    ops: list[tuple[bool, QosTaskMeta, int]], total_bw: float
) -> None:
    ev = QosPolicyEvaluator(total_memory=4000, total_bandwidth=total_bw)
    model: dict[str, QosTaskMeta] = {}
    for is_admit, task, victim in ops:
        if is_admit:
            if ev.admit(task).admitted:
                assert task.id not in model
                model[task.id] = task
        elif model:
            task_id = sorted(model)[victim % len(model)]
            ev.release(task_id)
            del model[task_id]
        assert ev.reserved_memory <= ev.total_memory
        assert ev.reserved_bandwidth <= ev.total_bandwidth
        assert ev.reserved_memory == sum(
            t.memory for t in model.values() if t.tier is not QoSPolicy.BEST_EFFORT
        )
        assert ev.best_effort_memory == sum(
            t.memory for t in model.values() if t.tier is QoSPolicy.BEST_EFFORT
        )
        assert set(ev.admitted_ids()) == set(model)
    for task_id in list(model):
        ev.release(task_id)
    assert ev.reserved_memory == 0
    assert ev.reserved_bandwidth == 0.0
    assert ev.best_effort_memory == 0
    assert ev.admitted_ids() == ()
