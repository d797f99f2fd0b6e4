"""Property tests: queue order, caps, and reservations under random operation sequences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pygpukit import InvalidArgument, QoSPolicy
from pygpukit._exceptions import AdmissionRejected
from pygpukit.runtime import Dispatcher, DispatcherConfig, Runtime, Task, TaskState

TIERS = list(QoSPolicy)
CAPS = {QoSPolicy.GUARANTEED: 1, QoSPolicy.BURSTABLE: 2, QoSPolicy.BEST_EFFORT: 1}

ops = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(0, 3), st.integers(-2, 2)),
        st.tuples(st.just("cancel"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("finish"), st.integers(0, 50), st.just(0)),
    ),
    max_size=60,
)


class _Ctx:
    def __init__(self, name: str, tier: QoSPolicy) -> None:
        self.name = name
        self.tier = tier


@settings(max_examples=150, deadline=None)
@given(ops=ops, strict=st.booleans())
def test_launches_respect_tier_then_priority_then_arrival(
    ops: list[tuple[str, int, int]], strict: bool
) -> None:
    contexts = [_Ctx(f"c{i}", TIERS[i % 3]) for i in range(4)]
    clock = [0.0]
    violations: list[str] = []
    running: list[Task] = []

    def launch(task: Task) -> None:
        running.append(task)
        if strict and task.tier is QoSPolicy.BEST_EFFORT and d.in_flight_tier[QoSPolicy.GUARANTEED]:
            violations.append(f"strict mode launched {task} while Guaranteed work was in flight")
        for other in d.queued():
            if other.tier is task.tier:
                if other.key < task.key:
                    violations.append(f"{task} launched before earlier-keyed {other}")
            elif other.key < task.key:  # a higher tier waits: it must be capped (or strict)
                cap = CAPS[other.tier]
                if d.in_flight_tier[other.tier] < cap:
                    violations.append(f"{task} launched while {other} could run")

    d = Dispatcher(
        DispatcherConfig(
            tier_in_flight=CAPS, context_in_flight=None, max_queued=None, strict=strict
        ),
        clock=lambda: clock[0],
    )
    d.bind(launch, None)
    submitted: list[Task] = []
    for op, a, b in ops:
        clock[0] += 1.0
        if op == "submit":
            ctx = contexts[a]
            task = Task(ctx, ctx.tier, print, (), {}, b, None, lambda v, e: None)
            submitted.append(task)
            d.enqueue(task)
        elif op == "cancel" and submitted:
            d.cancel(submitted[a % len(submitted)])
        elif op == "finish" and running:
            d.finished(running.pop(a % len(running)), None, None)
        for tier, cap in CAPS.items():
            assert 0 <= d.in_flight_tier[tier] <= cap
        for waiting in d.queued():  # nothing waits that could run: work-conserving
            held = d.in_flight_tier[waiting.tier] >= CAPS[waiting.tier] or (
                strict
                and waiting.tier is QoSPolicy.BEST_EFFORT
                and d.in_flight_tier[QoSPolicy.GUARANTEED] > 0
            )
            assert held, f"{waiting} waits after {op} though its tier has room"
    assert not violations, violations
    while running:  # finishing launches what waited, until the queue is empty
        d.finished(running.pop(0), None, None)
    assert d.in_flight() == 0
    assert all(t.state is not TaskState.RUNNING for t in submitted)
    assert d.queued() == [] and sum(d.queued_ctx.values()) == 0


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["create", "destroy"]),
            st.sampled_from(TIERS),
            st.integers(1, 600),
            st.integers(0, 600),
        ),
        max_size=30,
    )
)
def test_reservations_never_exceed_capacity_and_are_all_released(
    steps: list[tuple[str, QoSPolicy, int, int]],
) -> None:
    mib = 1 << 20
    with Runtime(backend="host", vram_limit=1024 * mib) as rt:
        capacity = rt.ledger.capacity
        live = []
        for i, (op, tier, max_mib, base_mib) in enumerate(steps):
            if op == "create":
                base = base_mib * mib if tier is QoSPolicy.BURSTABLE else None
                try:
                    live.append(rt.create_context(f"c{i}", max_mib * mib, base, tier))
                except (AdmissionRejected, InvalidArgument):
                    pass
            elif live:
                rt.destroy_context(live.pop(max_mib % len(live)))
            reserved = rt.ledger.reserved_total()
            assert 0 <= reserved <= capacity
            assert reserved == sum(c.usage().reserved for c in live)
            assert rt.available_vram() == capacity - reserved
        for ctx in live:
            rt.destroy_context(ctx)
        assert rt.ledger.reserved_total() == 0
        assert rt.available_vram() == capacity
