"""QosPolicyEvaluator: the tiers' admission rules, reservations and their invariant."""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pygpukit import AdmissionRejected, InvalidArgument, InvalidArgumentType, QoSPolicy
from pygpukit.qos import (
    AdmissionAction,
    QosEvaluation,
    QosPolicyEvaluator,
    QosTaskMeta,
)
from pygpukit.runtime import check_reservation

MiB = 1024**2
GiB = 1024**3

BE = QoSPolicy.BEST_EFFORT


def test_seed_snippet() -> None:
    evaluator = QosPolicyEvaluator(total_memory=8 * 1024**3, total_bandwidth=1.0)
    task = QosTaskMeta.guaranteed("inference-1", "LLM Inference", 256 * 1024 * 1024)
    result = evaluator.evaluate(task)
    assert result == QosEvaluation(
        admitted=True,
        action=AdmissionAction.ADMIT,
        priority=0,
        reason="reserves 256 MiB (GUARANTEED) of the 8 GiB unreserved, and bandwidth 0 of the "
        "1 unreserved",
        reserved_memory=256 * MiB,
        reserved_bandwidth=0.0,
        task=task,
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
        "it must reserve 256 MiB (GUARANTEED) but only 100 MiB of 8 GiB is unreserved; "
        "lower its memory, use a lower tier, or release reservations held by others"
    )
    r = ev.admit(QosTaskMeta.guaranteed("c", "C", MiB, bandwidth=0.5))
    assert r.reason == (
        "it must reserve bandwidth 0.5 (GUARANTEED) but only 0.25 of 1 is unreserved; "
        "lower its bandwidth, use a lower tier, or release reservations held by others"
    )
    r = ev.admit(QosTaskMeta.guaranteed("d", "D", GiB, bandwidth=0.5))
    assert r.reason == (
        "it must reserve 1 GiB (GUARANTEED) but only 100 MiB of 8 GiB is unreserved; "
        "lower its memory, use a lower tier, or release reservations held by others; "
        "its bandwidth 0.5 does not fit the 0.25 of 1 unreserved either"
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
        "reserves 1 GiB (BURSTABLE) of the 3 GiB unreserved, and bandwidth 0 of the 0.75 "
        "unreserved; its burst to 4 GiB exceeds the 3 GiB unreserved, so its bursts will be "
        "throttled"
    )
    assert ev.reserved_memory == 2 * GiB

    r = ev.admit(QosTaskMeta.burstable("b3", "big", 3 * GiB))
    assert (r.admitted, r.action) == (False, AdmissionAction.REJECT)
    assert r.reason == (
        "it must reserve 3 GiB (BURSTABLE) but only 2 GiB of 4 GiB is unreserved; "
        "lower its memory, use a lower tier, or release reservations held by others"
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
            r"^task id must be a non-empty str, not ''; pass a name$",
        ),
        (
            lambda: QosTaskMeta.guaranteed("i", "n", -1),
            r"^memory must not be negative, got -1; e\.g\. memory=2 \* GB$",
        ),
        (
            lambda: QosTaskMeta.burstable("i", "n", 1, burst_memory=-5),
            r"^burst_memory must not be negative, got -5; e\.g\. burst_memory=2 \* GB$",
        ),
        (
            lambda: QosTaskMeta.guaranteed("i", "n", 1, bandwidth=1.5),
            r"^bandwidth must be in \[0, 1\], got 1\.5; a fraction of the device$",
        ),
        (
            lambda: QosTaskMeta.best_effort("i", "n", 1, bandwidth=-0.1),
            r"^bandwidth must be in \[0, 1\], got -0\.1; a fraction of the device$",
        ),
        (
            lambda: QosTaskMeta("i", "n", QoSPolicy.GUARANTEED, 1, burst_memory=1),
            r"^burst_memory is only for Burstable tasks, got 1 on a guaranteed task; "
            r"use QosTaskMeta\.burstable\(\)$",
        ),
        (
            lambda: QosPolicyEvaluator(0),
            r"^total_memory must be positive, got 0; e\.g\. total_memory=2 \* GB$",
        ),
        (
            lambda: QosPolicyEvaluator(GiB, total_bandwidth=float("nan")),
            r"^total_bandwidth must be a finite number > 0, got nan; 1\.0 = the whole device$",
        ),
    ],
)
def test_bad_values(make: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        make()
    assert isinstance(info.value, ValueError) and not isinstance(info.value, TypeError)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: QosTaskMeta.guaranteed("i", None, 1),  # type: ignore[arg-type]
            r"^task name must be a non-empty str, not None; pass a name$",
        ),
        (
            lambda: QosTaskMeta.guaranteed("i", "n", True),
            r"^memory must be an integer number of bytes \(e\.g\. 4 \* GB\), not True$",
        ),
        (
            lambda: QosTaskMeta.guaranteed("i", "n", 1.5),  # type: ignore[arg-type]
            r"^memory must be an integer number of bytes \(e\.g\. 4 \* GB\), not 1\.5$",
        ),
        (
            lambda: QosTaskMeta.guaranteed("i", "n", 1, bandwidth="all"),  # type: ignore[arg-type]
            r"^bandwidth must be a number, not 'all'; a fraction of the device$",
        ),
        (
            lambda: QosTaskMeta("i", "n", "guaranteed", 1),  # type: ignore[arg-type]
            r"^tier must be a QoSPolicy, not 'guaranteed'; pass e\.g\. QoSPolicy\.GUARANTEED$",
        ),
        (
            lambda: QosPolicyEvaluator("8GB"),  # type: ignore[arg-type]
            r"^total_memory must be an integer number of bytes \(e\.g\. 4 \* GB\), not '8GB'$",
        ),
        (
            lambda: QosPolicyEvaluator(GiB).evaluate("task"),  # type: ignore[arg-type]
            r"^the task must be a QosTaskMeta, not 'task'; build one with "
            r"QosTaskMeta\.guaranteed/burstable/best_effort\(\)$",
        ),
        (
            lambda: QosPolicyEvaluator(GiB).reserve("result"),  # type: ignore[arg-type]
            r"^reserve\(\)'s argument must be a QosEvaluation, not 'result'; pass what "
            r"evaluate\(\) returned$",
        ),
    ],
)
def test_bad_types(make: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidArgumentType, match=message) as info:
        make()
    assert isinstance(info.value, TypeError) and not isinstance(info.value, ValueError)


def test_numpy_integers_are_byte_counts() -> None:
    ev = QosPolicyEvaluator(np.int64(8 * GiB), total_bandwidth=np.float32(1.0))
    task = QosTaskMeta.guaranteed("t", "t", np.int64(GiB), bandwidth=np.float64(0.25))
    assert type(ev.total_memory) is int and type(task.memory) is int
    assert type(task.bandwidth) is float
    assert ev.admit(task).admitted
    assert (ev.reserved_memory, ev.reserved_bandwidth) == (GiB, 0.25)


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


# -- evaluate() decides, reserve() commits, admit() does both ----------------------------


def test_evaluate_then_reserve_commits_and_returns_the_commitment() -> None:
    ev = QosPolicyEvaluator(8 * GiB)
    task = QosTaskMeta.guaranteed("g", "g", GiB, bandwidth=0.5)
    result = ev.evaluate(task)
    assert result.admitted and result.task is task
    assert (ev.reserved_memory, ev.reserved_bandwidth, ev.admitted_ids()) == (0, 0.0, ())
    committed = ev.reserve(result)
    assert committed == result  # nothing changed in between
    assert (ev.reserved_memory, ev.reserved_bandwidth, ev.admitted_ids()) == (GiB, 0.5, ("g",))
    ev.release("g")
    assert (ev.reserved_memory, ev.reserved_bandwidth, ev.admitted_ids()) == (0, 0.0, ())


def test_twenty_stale_evaluations_commit_only_what_fits() -> None:
    ev = QosPolicyEvaluator(8 * GiB)
    tasks = [QosTaskMeta.guaranteed(f"g{i}", "llm", GiB) for i in range(20)]
    results = [ev.evaluate(t) for t in tasks]  # all decided against an empty device
    assert all(r.admitted for r in results)
    committed, refused = [], []
    for r in results:
        try:
            ev.reserve(r)
            committed.append(r.task.id)
        except AdmissionRejected as exc:
            refused.append((r.task.id, str(exc)))
    assert committed == [f"g{i}" for i in range(8)]
    assert len(refused) == 12
    assert refused[0] == (
        "g8",
        "task 'g8' (its evaluation is stale) was not admitted: it must reserve 1 GiB "
        "(GUARANTEED) but only 0 B of 8 GiB is unreserved; lower its memory, use a lower tier, "
        "or release reservations held by others",
    )
    assert (ev.reserved_memory, ev.available_memory) == (8 * GiB, 0)
    assert ev.admitted_ids() == tuple(committed)


def test_evaluate_then_reserve_from_many_threads_never_overcommits() -> None:
    ev = QosPolicyEvaluator(8 * GiB)
    barrier = threading.Barrier(20)
    outcome: dict[str, bool] = {}

    def worker(i: int) -> None:
        result = ev.evaluate(QosTaskMeta.guaranteed(f"g{i}", "llm", GiB))
        barrier.wait()  # every thread has decided before any commits
        try:
            ev.reserve(result)
            outcome[f"g{i}"] = True
        except AdmissionRejected:
            outcome[f"g{i}"] = False

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(outcome.values()) == 8 and len(outcome) == 20
    assert ev.reserved_memory == 8 * GiB
    assert set(ev.admitted_ids()) == {k for k, ok in outcome.items() if ok}


def test_reserve_refuses_a_rejection_and_a_second_commit() -> None:
    ev = QosPolicyEvaluator(GiB)
    rejected = ev.evaluate(QosTaskMeta.guaranteed("big", "big", 2 * GiB))
    with pytest.raises(
        InvalidArgument,
        match=r"^reserve\(\) commits admitted evaluations only, and task 'big' was not admitted "
        r"\(it must reserve 2 GiB \(GUARANTEED\) but only 1 GiB of 1 GiB is unreserved; .*\); "
        r"evaluate\(\) it again later, or call admit\(\)$",
    ):
        ev.reserve(rejected)
    result = ev.evaluate(QosTaskMeta.best_effort("e", "e", MiB))
    ev.reserve(result)
    with pytest.raises(
        AdmissionRejected,
        match=r"^task 'e' \(its evaluation is stale\) was not admitted: task id 'e' is already "
        r"admitted; release\('e'\) it first or use a unique id$",
    ):
        ev.reserve(result)
    assert (ev.best_effort_memory, ev.reserved_memory, ev.admitted_ids()) == (MiB, 0, ("e",))


def test_a_commit_reports_what_changed_since_the_evaluation() -> None:
    ev = QosPolicyEvaluator(4 * GiB)
    burst = ev.evaluate(QosTaskMeta.burstable("b", "tts", GiB, burst_memory=2 * GiB))
    assert burst.action is AdmissionAction.ADMIT  # 3 GiB of burst room then
    ev.admit(QosTaskMeta.guaranteed("g", "llm", 2 * GiB))
    committed = ev.reserve(burst)  # the base still fits; the burst room shrank
    assert (committed.admitted, committed.action) == (True, AdmissionAction.THROTTLE)
    assert ev.reserved_memory == 3 * GiB


def test_the_evaluator_and_the_ledger_word_the_rule_the_same_way() -> None:
    from pygpukit.runtime._ledger import Ledger

    rule = check_reservation(3 * GiB, 2 * GiB, 4 * GiB, tier=QoSPolicy.GUARANTEED, knob="KNOB")
    assert rule == type(rule)(
        False,
        "it must reserve 3 GiB (GUARANTEED) but only 2 GiB of 4 GiB is unreserved; lower its "
        "KNOB, use a lower tier, or release reservations held by others",
    )
    ev = QosPolicyEvaluator(4 * GiB)
    ev.admit(QosTaskMeta.guaranteed("a", "a", 2 * GiB))
    verdict = ev.evaluate(QosTaskMeta.guaranteed("b", "b", 3 * GiB))
    assert verdict.reason == rule.reason.replace("KNOB", "memory")

    ledger = Ledger(4 * GiB)
    ledger.open("a", QoSPolicy.GUARANTEED, 2 * GiB, 0)
    with pytest.raises(AdmissionRejected) as info:
        ledger.open("b", QoSPolicy.GUARANTEED, 3 * GiB, 0)
    assert str(info.value) == "context 'b' was not admitted: " + rule.reason.replace(
        "KNOB", "max_vram"
    )
    with pytest.raises(AdmissionRejected) as info:
        ledger.open("c", QoSPolicy.BURSTABLE, 4 * GiB, 3 * GiB)
    assert str(info.value) == "context 'c' was not admitted: " + rule.reason.replace(
        "KNOB", "base_vram"
    ).replace("GUARANTEED", "BURSTABLE")


def test_the_rule_admits_an_exact_fit_and_best_effort_always() -> None:
    assert check_reservation(GiB, GiB, GiB, tier=QoSPolicy.GUARANTEED, knob="m").fits
    assert not check_reservation(GiB + 1, GiB, GiB, tier=QoSPolicy.GUARANTEED, knob="m").fits
    assert check_reservation(0, 0, GiB, tier=BE, knob="m").fits
    refused = check_reservation(1, -5, GiB, tier=QoSPolicy.BURSTABLE, knob="m")
    assert "but only 0 B of 1 GiB" in refused.reason  # a deficit reads as nothing left


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
_ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "evaluate", "reserve", "release"]), _tasks, st.integers(0, 11)
    ),
    max_size=60,
)


def _fits(model: dict[str, QosTaskMeta], task: QosTaskMeta, memory: int, bandwidth: float) -> bool:
    """The tiers' rules, from the test's own books (DESIGN §6)."""
    if task.id in model:
        return False
    reserved = sum(t.memory for t in model.values() if t.tier is not BE)
    if task.tier is BE:  # spare memory only: unreserved and not in best-effort use
        used = sum(t.memory for t in model.values() if t.tier is BE)
        return task.memory <= memory - reserved - used
    bw = math.fsum([*(t.bandwidth for t in model.values() if t.tier is not BE), task.bandwidth])
    return reserved + task.memory <= memory and bw <= bandwidth


@settings(max_examples=300, database=None, deadline=None)
@given(ops=_ops, total_bw=st.sampled_from([1.0, 0.5, 0.3]))
def test_reservations_never_exceed_totals(
    ops: list[tuple[str, QosTaskMeta, int]], total_bw: float
) -> None:
    ev = QosPolicyEvaluator(total_memory=4000, total_bandwidth=total_bw)
    model: dict[str, QosTaskMeta] = {}
    pending: list[QosEvaluation] = []  # evaluations not committed yet, growing stale
    for op, task, victim in ops:
        if op == "admit":
            expected = _fits(model, task, 4000, total_bw)
            assert ev.admit(task).admitted == expected
            if expected:
                model[task.id] = task
        elif op == "evaluate":
            result = ev.evaluate(task)
            assert result.admitted == _fits(model, task, 4000, total_bw)
            if result.admitted:
                pending.append(result)
        elif op == "reserve" and pending:
            result = pending.pop(victim % len(pending))
            expected = _fits(model, result.task, 4000, total_bw)
            if expected:
                assert ev.reserve(result).admitted
                model[result.task.id] = result.task
            else:
                with pytest.raises(AdmissionRejected):
                    ev.reserve(result)
        elif op == "release" and model:
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
