"""Property tests: launch order, caps, deadlines and reservations under random operations.

The launch-order oracle is a model written here from the rules as documented — tier
(Guaranteed, Burstable, BestEffort), then priority (lower first), then arrival; a task
runs when its tier, its context and strict mode allow; a task past its deadline never
runs — and computed from the test's own record of what it submitted. It uses nothing of
the dispatcher's (no ``Task.key``, no rank table), so a dispatcher that orders wrongly
disagrees with it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pygpukit import DeadlineExceeded, InvalidArgument, QoSPolicy
from pygpukit._exceptions import AdmissionRejected
from pygpukit.runtime import Dispatcher, DispatcherConfig, Runtime, Task, TaskState

G, B, BE = QoSPolicy.GUARANTEED, QoSPolicy.BURSTABLE, QoSPolicy.BEST_EFFORT
TIER_RANK = {G: 0, B: 1, BE: 2}  # the order the tiers are documented to launch in
TIERS = [G, B, BE]
N_CONTEXTS = 5  # contexts 0 and 3 are Guaranteed, 1 and 4 Burstable: several share a tier

ops = st.lists(
    st.one_of(
        # submit on context a, priority b, deadline c seconds after now (None: no deadline)
        st.tuples(
            st.just("submit"),
            st.integers(0, N_CONTEXTS - 1),
            st.integers(-2, 2),
            st.none() | st.integers(0, 3),
        ),
        st.tuples(st.just("cancel"), st.integers(0, 50), st.just(0), st.none()),
        st.tuples(st.just("finish"), st.integers(0, 50), st.just(0), st.none()),
        # submit()'s own timeout firing for a waiting task whose deadline passed
        st.tuples(st.just("timeout"), st.integers(0, 50), st.just(0), st.none()),
        st.tuples(st.just("tick"), st.integers(1, 3), st.just(0), st.none()),
    ),
    max_size=60,
)
caps = st.sampled_from([1, 2, None])


class _Ctx:
    def __init__(self, name: str, tier: QoSPolicy) -> None:
        self.name = name
        self.tier = tier

    def __repr__(self) -> str:
        return self.name


def _work() -> None:  # the dispatcher never calls it: launching is the test's callback
    raise AssertionError("not run")


@dataclass(eq=False)
class _Sub:
    """What the test knows of one submission."""

    arrival: int
    ctx: int
    tier: QoSPolicy
    priority: int
    deadline: float | None
    task: Task
    outcomes: list[tuple[object, BaseException | None]] = field(default_factory=list)
    cancelled: bool = False

    def order(self) -> tuple[int, int, int]:
        return (TIER_RANK[self.tier], self.priority, self.arrival)

    def __repr__(self) -> str:
        return f"#{self.arrival}(c{self.ctx} {self.tier.value} p{self.priority} d{self.deadline})"


class _Model:
    """The documented launch rules, over the test's own records."""

    def __init__(
        self, tier_caps: dict[QoSPolicy, int | None], ctx_cap: int | None, strict: bool
    ) -> None:
        self.tier_caps = tier_caps
        self.ctx_cap = ctx_cap
        self.strict = strict
        self.waiting: list[_Sub] = []
        self.running: list[_Sub] = []
        self.tier_count: Counter[QoSPolicy] = Counter()
        self.ctx_count: Counter[int] = Counter()

    @staticmethod
    def lapsed(sub: _Sub, now: float) -> bool:
        return sub.deadline is not None and now > sub.deadline

    def held(self, sub: _Sub) -> bool:
        """Whether the caps or strict mode keep ``sub`` from launching now."""
        cap = self.tier_caps[sub.tier]
        return (
            (cap is not None and self.tier_count[sub.tier] >= cap)
            or (self.ctx_cap is not None and self.ctx_count[sub.ctx] >= self.ctx_cap)
            or (self.strict and sub.tier is BE and self.tier_count[G] > 0)
        )

    def settle(self, now: float) -> list[_Sub]:
        """Launch what may run, the best first, until nothing more may; in launch order."""
        launched = []
        while True:
            ready = [s for s in self.waiting if not self.lapsed(s, now) and not self.held(s)]
            if not ready:
                return launched
            best = min(ready, key=_Sub.order)
            self.waiting.remove(best)
            self.running.append(best)
            self.tier_count[best.tier] += 1
            self.ctx_count[best.ctx] += 1
            launched.append(best)

    def finish(self, sub: _Sub) -> None:
        self.running.remove(sub)
        self.tier_count[sub.tier] -= 1
        self.ctx_count[sub.ctx] -= 1


ONE = {G: 1, B: 1, BE: 1}


def _submit(ctx: int, priority: int = 0) -> tuple[str, int, int, None]:
    return ("submit", ctx, priority, None)


FINISH = ("finish", 0, 0, None)


# Cases the search may take long to find, each a check of one rule: a Guaranteed task
# occupies the tier, two more wait on two Guaranteed contexts, the first finishes.
@example(  # priority: the later, lower-numbered task goes first
    ops=[_submit(0), _submit(3, 1), _submit(0, -1), FINISH],
    strict=False,
    tier_caps=ONE,
    ctx_cap=None,
)
@example(  # arrival: between equal priorities, on different contexts, the earlier
    ops=[_submit(0), _submit(3), _submit(0), FINISH],
    strict=False,
    tier_caps=ONE,
    ctx_cap=None,
)
@example(  # tier: in strict mode Guaranteed launches first, and then BestEffort waits
    ops=[_submit(0), _submit(2, -2), _submit(3, 2), FINISH],
    strict=True,
    tier_caps=ONE,
    ctx_cap=None,
)
@settings(max_examples=200, deadline=None)
@given(
    ops=ops,
    strict=st.booleans(),
    tier_caps=st.fixed_dictionaries({G: caps, B: caps, BE: caps}),
    ctx_cap=caps,
)
def test_launches_follow_tier_then_priority_then_arrival(
    ops: list[tuple[str, int, int, int | None]],
    strict: bool,
    tier_caps: dict[QoSPolicy, int | None],
    ctx_cap: int | None,
) -> None:
    contexts = [_Ctx(f"c{i}", TIERS[i % 3]) for i in range(N_CONTEXTS)]
    now = [0.0]
    launched: list[Task] = []  # in the order the dispatcher launched them
    d = Dispatcher(
        DispatcherConfig(
            tier_in_flight=tier_caps, context_in_flight=ctx_cap, max_queued=None, strict=strict
        ),
        clock=lambda: now[0],
    )
    d.bind(launched.append, None)
    model = _Model(tier_caps, ctx_cap, strict)
    subs: list[_Sub] = []
    by_task: dict[int, _Sub] = {}

    def deliver(sub: _Sub):  # type: ignore[no-untyped-def]
        return lambda value, exc: sub.outcomes.append((value, exc))

    for step, (op, a, b, c) in enumerate(ops):
        now[0] += 1.0
        t = now[0]
        launched.clear()
        if op == "tick":
            now[0] += a
            continue
        if op == "submit":
            deadline = None if c is None else t + c
            ctx = contexts[a]
            task = Task(ctx, ctx.tier, _work, (), {}, b, deadline, lambda v, e: None)
            sub = _Sub(len(subs), a, ctx.tier, b, deadline, task)
            task.deliver = deliver(sub)
            subs.append(sub)
            by_task[id(task)] = sub
            model.waiting.append(sub)
            d.enqueue(task)
        elif op == "cancel" and subs:
            sub = subs[a % len(subs)]
            took_out = d.cancel(sub.task)
            if sub in model.waiting and not model.lapsed(sub, t):
                assert took_out, f"step {step}: cancel({sub}) refused a waiting task"
            elif sub not in model.waiting:
                assert not took_out, f"step {step}: cancel({sub}) took out a launched task"
            if took_out:  # (a lapsed task is either still queued or already expired)
                sub.cancelled = True
                model.waiting.remove(sub)
        elif op == "timeout" and subs:
            sub = subs[a % len(subs)]
            if sub in model.waiting and model.lapsed(sub, t):
                d.expire(sub.task)  # True, or False where a pass already expired it
        elif op == "finish" and model.running:
            sub = model.running[a % len(model.running)]
            model.finish(sub)
            d.finished(sub.task, sub.arrival, None)
        expected = model.settle(t)
        got = [by_task[id(task)] for task in launched]
        assert got == expected, f"step {step} ({op} at t={t}): launched {got}, not {expected}"
        _check_state(d, model, t, step, op)
    while model.running:  # finishing launches what waited, until the queue is empty
        sub = model.running[0]
        model.finish(sub)
        launched.clear()
        d.finished(sub.task, sub.arrival, None)
        got = [by_task[id(task)] for task in launched]
        assert got == model.settle(now[0]), "launched while draining"
    assert all(model.lapsed(s, now[0]) for s in model.waiting), "runnable work was left waiting"
    assert d.in_flight() == 0 and d.queued() == [] and sum(d.queued_ctx.values()) == 0
    for sub in subs:
        if sub.cancelled:
            assert (sub.task.state, sub.outcomes) == (TaskState.CANCELLED, []), sub
        elif sub in model.waiting:  # past its deadline before it could launch: told once
            assert sub.task.state is TaskState.EXPIRED, sub
            assert len(sub.outcomes) == 1 and isinstance(sub.outcomes[0][1], DeadlineExceeded)
        else:
            assert (sub.task.state, sub.outcomes) == (TaskState.DONE, [(sub.arrival, None)]), sub
            assert sub.deadline is None or sub.task.t_launched <= sub.deadline, sub


def _check_state(d: Dispatcher, model: _Model, t: float, step: int, op: str) -> None:
    """Counters match the model's, caps hold, and nothing waits that could run."""
    where = f"step {step} ({op} at t={t})"
    for tier in TIERS:
        assert d.in_flight_tier[tier] == model.tier_count[tier], where
        cap = model.tier_caps[tier]
        assert cap is None or model.tier_count[tier] <= cap, where
    queued = set(map(id, d.queued()))
    for sub in model.waiting:
        if not model.lapsed(sub, t):
            assert id(sub.task) in queued, f"{where}: {sub} is not queued"
            # work-conserving: it waits only because something keeps it from running
            assert model.held(sub), f"{where}: {sub} waits though it may run"
    waiting = {id(s.task) for s in model.waiting}
    assert queued <= waiting, f"{where}: the dispatcher holds tasks the test does not"


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
