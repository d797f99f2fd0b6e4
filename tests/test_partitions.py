"""PartitionManager: limits, memory enforcement and decayed compute shares."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pygpukit._exceptions import (
    AdmissionRejected,
    BudgetReason,
    InvalidArgument,
    InvalidArgumentType,
    PygpukitError,
    VRAMBudgetExceeded,
)
from pygpukit.qos._partitions import (
    PartitionConfig,
    PartitionInfo,
    PartitionLimits,
    PartitionManager,
)

MiB = 1024**2
GiB = 1024**3


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def seed_manager(clock: FakeClock | None = None) -> PartitionManager:
    config = PartitionConfig(total_memory=8 * 1024**3)
    manager = PartitionManager(config, clock=clock or FakeClock())
    manager.create_partition(
        "inference", "Inference Partition", PartitionLimits().memory(4 * 1024**3).compute(0.5)
    )
    manager.create_partition(
        "training", "Training Partition", PartitionLimits().memory(4 * 1024**3).compute(0.5)
    )
    return manager


def test_seed_snippet() -> None:
    manager = seed_manager()
    info = manager.get_partition("inference")
    assert info == PartitionInfo(
        id="inference",
        name="Inference Partition",
        memory_limit=4 * GiB,
        compute_limit=0.5,
        memory_used=0,
        contexts=(),
        gpu_time_s=0.0,
        recent_share=0.0,
    )
    assert [p.id for p in manager.partitions()] == ["inference", "training"]


def test_limits_builder_is_immutable() -> None:
    base = PartitionLimits()
    with_mem = base.memory(GiB)
    both = with_mem.compute(0.25)
    assert base == PartitionLimits(None, None)
    assert with_mem == PartitionLimits(GiB, None)
    assert both == PartitionLimits(GiB, 0.25)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: PartitionLimits().memory(0),
            r"^memory must be positive, got 0; e\.g\. memory=2 \* GB$",
        ),
        (
            lambda: PartitionLimits().compute(0),
            r"^compute must be in \(0, 1\], got 0; a share of the device, e\.g\. 0\.5$",
        ),
        (
            lambda: PartitionLimits().compute(1.5),
            r"^compute must be in \(0, 1\], got 1\.5; a share of the device, e\.g\. 0\.5$",
        ),
        (
            lambda: PartitionConfig(total_memory=-1),
            r"^total_memory must be positive, got -1; e\.g\. total_memory=2 \* GB$",
        ),
        (
            lambda: PartitionConfig(total_memory=GiB, total_compute=2.0),
            r"^total_compute must be in \(0, 1\], got 2\.0; a share of the device, e\.g\. 0\.5$",
        ),
        (
            lambda: PartitionManager(PartitionConfig(GiB), window_s=0),
            r"^window_s must be a finite number > 0, got 0$",
        ),
    ],
)
def test_validation(make: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        make()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: PartitionLimits().memory(1.0),  # type: ignore[arg-type]
            r"^memory must be an integer number of bytes \(e\.g\. 4 \* GB\), not 1\.0$",
        ),
        (
            lambda: PartitionLimits().compute("half"),  # type: ignore[arg-type]
            r"^compute must be a number, not 'half'; a share of the device, e\.g\. 0\.5$",
        ),
        (
            lambda: PartitionManager({"total_memory": GiB}),  # type: ignore[arg-type]
            r"^config must be a PartitionConfig, not \{'total_memory': 1073741824\}; pass "
            r"PartitionConfig\(total_memory=\.\.\.\)$",
        ),
        (
            lambda: seed_manager().create_partition("p", 7, PartitionLimits()),  # type: ignore[arg-type]
            r"^partition name must be a non-empty str, not 7; pass a name$",
        ),
        (
            lambda: seed_manager().create_partition("p", "p", 0.5),  # type: ignore[arg-type]
            r"^limits must be a PartitionLimits, not 0\.5; build one with "
            r"PartitionLimits\(\)\.memory\(n\)\.compute\(share\)$",
        ),
        (
            lambda: seed_manager().charge("inference", "llm", "1"),  # type: ignore[arg-type]
            r"^nbytes must be an integer number of bytes \(e\.g\. 4 \* GB\), not '1'$",
        ),
    ],
)
def test_wrong_types_are_type_errors(make: Callable[[], object], message: str) -> None:
    with pytest.raises(InvalidArgumentType, match=message) as info:
        make()
    assert isinstance(info.value, TypeError) and isinstance(info.value, PygpukitError)


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers() -> None:
    limits = PartitionLimits().memory(np.int64(2 * GiB)).compute(np.float32(0.5))
    assert (limits.memory_limit, limits.compute_limit) == (2 * GiB, 0.5)
    assert type(limits.memory_limit) is int and type(limits.compute_limit) is float
    manager = PartitionManager(PartitionConfig(np.uint64(8 * GiB)), clock=FakeClock())
    manager.create_partition("p", "p", limits)
    manager.attach("p", "ctx")
    manager.charge("p", "ctx", np.int32(4096))
    assert manager.get_partition("p").memory_used == 4096


def test_overcommit_rejected() -> None:
    manager = seed_manager()
    with pytest.raises(
        AdmissionRejected,
        match=r"^partition 'extra' was not admitted: its memory limit of 1 GiB does not fit "
        r"the 0 B of 8 GiB not yet given to partitions; lower it or delete another partition$",
    ):
        manager.create_partition("extra", "Extra", PartitionLimits().memory(GiB).compute(0.1))
    manager.delete_partition("training")
    with pytest.raises(
        AdmissionRejected,
        match=r"^partition 'extra' was not admitted: its compute limit of 0\.75 does not fit "
        r"the 0\.5 of 1 not yet given to partitions; lower it or delete another partition$",
    ):
        manager.create_partition("extra", "Extra", PartitionLimits().memory(GiB).compute(0.75))
    assert [p.id for p in manager.partitions()] == ["inference"]


def test_unset_limits_take_what_is_left() -> None:
    manager = PartitionManager(PartitionConfig(8 * GiB), clock=FakeClock())
    manager.create_partition("a", "A", PartitionLimits().memory(3 * GiB).compute(0.7))
    info = manager.create_partition("b", "B", PartitionLimits())
    assert info.memory_limit == 5 * GiB
    assert info.compute_limit == pytest.approx(0.3)
    with pytest.raises(
        AdmissionRejected,
        match=r"^partition 'c' was not admitted: no memory is left unallocated for its default "
        r"limit; set its limits explicitly or delete another partition$",
    ):
        manager.create_partition("c", "C", PartitionLimits())
    with pytest.raises(AdmissionRejected, match=r"^partition 'c' was not admitted: no compute "):
        manager.create_partition("c", "C", PartitionLimits().memory(1))


def test_shares_that_sum_to_the_total_fit() -> None:
    manager = PartitionManager(PartitionConfig(10 * GiB), clock=FakeClock())
    for i in range(10):
        manager.create_partition(f"p{i}", "p", PartitionLimits().memory(GiB).compute(0.1))
    assert math.fsum(p.compute_limit for p in manager.partitions()) == pytest.approx(1.0)


def test_duplicate_and_unknown_ids() -> None:
    manager = seed_manager()
    with pytest.raises(
        InvalidArgument,
        match=r"^a partition with id 'inference' already exists; pick another id or "
        r"delete_partition\(\) it first$",
    ):
        manager.create_partition("inference", "again", PartitionLimits().memory(1))
    with pytest.raises(
        InvalidArgument,
        match=r"^no partition has id 'nope' \(known: 'inference', 'training'\); "
        r"create_partition\(\) it first$",
    ):
        manager.charge("nope", "ctx", 1)
    for call in (manager.get_partition, manager.delete_partition, manager.recent_share):
        with pytest.raises(InvalidArgument, match=r"^no partition has id 'nope' "):
            call("nope")


def test_charge_release_and_limit() -> None:
    manager = seed_manager()
    manager.attach("inference", "llm")
    manager.charge("inference", "llm", 3 * GiB)
    with pytest.raises(
        VRAMBudgetExceeded,
        match=r"^context 'llm' asked for 2 GiB but only 1 GiB is available within the 4 GiB "
        r"memory limit of partition 'inference'; free memory in the partition's contexts, or "
        r"give the partition a larger memory limit$",
    ) as info:
        manager.charge("inference", "llm", 2 * GiB)
    exc = info.value
    assert (exc.context, exc.requested, exc.available, exc.budget) == ("llm", 2 * GiB, GiB, 4 * GiB)
    assert (exc.reason, exc.partition) == (BudgetReason.PARTITION, "inference")
    assert manager.get_partition("inference").memory_used == 3 * GiB  # nothing recorded
    manager.charge("inference", "llm", GiB)  # exactly to the limit
    with pytest.raises(VRAMBudgetExceeded, match=r"^context 'llm' asked for 1 B but only 0 B "):
        manager.charge("inference", "llm", 1)
    manager.charge("inference", "llm", 0)
    manager.release("inference", 4 * GiB)
    assert manager.get_partition("inference").memory_used == 0
    with pytest.raises(
        InvalidArgument,
        match=r"^cannot release 1 B from partition 'inference': only 0 B is charged; "
        r"release what was charged$",
    ):
        manager.release("inference", 1)
    with pytest.raises(
        InvalidArgument,
        match=r"^context 'tts' is not attached to partition 'inference'; attach\(\) each "
        r"context once, before charging or detaching it$",
    ):
        manager.charge("inference", "tts", 1)


def test_attach_detach_delete() -> None:
    manager = seed_manager()
    manager.attach("training", "a")
    manager.attach("training", "b")
    assert manager.get_partition("training").contexts == ("a", "b")
    with pytest.raises(InvalidArgument, match=r"^context 'a' is already attached to partition "):
        manager.attach("training", "a")
    with pytest.raises(
        InvalidArgument,
        match=r"^partition 'training' still has contexts attached \(a, b\); destroy or detach "
        r"them before deleting it$",
    ):
        manager.delete_partition("training")
    manager.detach("training", "a")
    manager.detach("training", "b")
    with pytest.raises(InvalidArgument, match=r"^context 'a' is not attached to partition "):
        manager.detach("training", "a")
    manager.delete_partition("training")
    # its limits are free again
    manager.create_partition("new", "New", PartitionLimits().memory(4 * GiB).compute(0.5))


def test_compute_share_decays_with_the_clock() -> None:
    clock = FakeClock()
    manager = seed_manager(clock)
    assert manager.recent_share("inference") == 0.0
    manager.record_gpu_time("inference", 0.3)
    manager.record_gpu_time("training", 0.1)
    assert manager.recent_share("inference") == pytest.approx(0.75)
    assert manager.recent_share("training") == pytest.approx(0.25)

    clock.now = 2.0  # both decay by e^-2: shares keep their ratio
    assert manager.recent_share("inference") == pytest.approx(0.75)
    manager.record_gpu_time("training", 0.4 * math.exp(-2))
    # inference 0.3e^-2 vs training 0.1e^-2 + 0.4e^-2
    assert manager.recent_share("training") == pytest.approx(5 / 8)
    info = manager.get_partition("training")
    assert info.gpu_time_s == pytest.approx(0.1 + 0.4 * math.exp(-2))
    assert info.recent_share == pytest.approx(5 / 8)


def test_over_share_only_when_contending() -> None:
    clock = FakeClock()
    manager = seed_manager(clock)
    manager.record_gpu_time("inference", 0.9)
    # alone on the GPU: a 100% share is not over its 0.5 limit, nobody else wants time
    assert manager.recent_share("inference") == 1.0
    assert not manager.over_share("inference")

    clock.now = 0.5
    manager.record_gpu_time("training", 0.1)
    assert manager.over_share("inference")
    assert not manager.over_share("training")

    clock.now = 1.6  # training last recorded 1.1 s ago: outside the window, no contention
    assert manager.recent_share("inference") > 0.5
    assert not manager.over_share("inference")
    assert manager.get_partition("inference").gpu_time_s == 0.9  # the total never decays


def test_record_gpu_time_validation() -> None:
    manager = seed_manager()
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(
            InvalidArgument, match=rf"^seconds must be a finite number >= 0, got {bad!r}$"
        ):
            manager.record_gpu_time("inference", bad)
    for wrong in (True, "1", None):
        with pytest.raises(InvalidArgumentType, match=r"^seconds must be a number, not "):
            manager.record_gpu_time("inference", wrong)  # type: ignore[arg-type]


def test_repr_shows_state() -> None:
    manager = seed_manager()
    manager.attach("inference", "llm")
    manager.charge("inference", "llm", 512 * MiB)
    assert repr(manager) == (
        "<PartitionManager total=8 GiB partitions=[inference: 512 MiB/4 GiB compute=0.5 "
        "contexts=1, training: 0 B/4 GiB compute=0.5 contexts=0]>"
    )


@settings(max_examples=300, database=None, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 1500)), max_size=80))
def test_memory_used_stays_within_limit(ops: list[tuple[bool, int]]) -> None:
    manager = PartitionManager(PartitionConfig(total_memory=1000), clock=FakeClock())
    manager.create_partition("p", "P", PartitionLimits())
    manager.attach("p", "ctx")
    used = 0
    for is_charge, nbytes in ops:
        if is_charge:
            try:
                manager.charge("p", "ctx", nbytes)
                used += nbytes
            except VRAMBudgetExceeded:
                assert used + nbytes > 1000
        else:
            try:
                manager.release("p", nbytes)
                used -= nbytes
            except InvalidArgument:
                assert nbytes > used
        info = manager.get_partition("p")
        assert 0 <= info.memory_used <= info.memory_limit == 1000
        assert info.memory_used == used
