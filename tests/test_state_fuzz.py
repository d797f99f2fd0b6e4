"""A stateful fuzz of the host runtime: contexts, sessions, arrays, tasks, eviction, handlers.

Hypothesis drives one runtime (16 MiB, host backend) through random sequences of: creating
contexts of every tier and destroying them; entering sessions and exiting them, out of
order too; allocating arrays through ``rt.xp`` (in a session or outside any; bad shapes
too) and freeing them; submitting tasks that allocate, and cancelling them; handing arrays
to the runtime as evictable, bursting past a base so that they are evicted, and reading or
releasing them; adding memory-pressure handlers that agree, refuse, raise, or allocate
themselves. The model is the test's own record of what it holds. After every step:

- each context's charge (``usage().used`` and ``usage().held``) equals the bytes of the
  arrays the model holds from it (an evictable's only while it is on the device), and the
  allocations outside any session likewise;
- the reservations sum to at most the runtime's capacity, and to exactly what the live
  contexts' tiers reserve;
- nothing is queued or in flight for a destroyed context;
- no context is bound outside a session, and inside one it is the innermost's.

Whatever fails must fail with the documented error (a budget error, a closed context, a
misnested exit), never another one, and leave nothing charged. At the end, with everything
dropped, every charge is back to zero.
"""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from pygpukit import (
    MB,
    AdmissionRejected,
    ContextClosed,
    ContextError,
    InvalidArgument,
    InvalidArgumentType,
    QoSPolicy,
    VRAMBudgetExceeded,
    context_session,
    current_context,
)
from pygpukit.runtime import Evictable, ExecutionContext, Runtime

G, B, BE = QoSPolicy.GUARANTEED, QoSPolicy.BURSTABLE, QoSPolicy.BEST_EFFORT
CAPACITY = 16 * MB
ALIGN = 512  # the host pool rounds every allocation up to this
SIZES = st.sampled_from([0, 1, 700, 256 * 1024, MB, 2 * MB, 3 * MB, 5 * MB, 9 * MB])
PICK = st.integers(0, 1 << 16)  # an index into one of the model's lists, taken modulo


def _charged(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _alloc(rt: Runtime, nbytes: int) -> Any:
    return rt.xp.empty(nbytes, dtype="uint8")


def _alloc_and_drop(rt: Runtime, nbytes: int) -> None:
    a = rt.xp.empty(nbytes, dtype="uint8")
    del a


class RuntimeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert current_context() is None  # nothing left bound by the example before
        self.rt = Runtime(backend="host", vram_limit=CAPACITY)
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self.portal = self._portal_cm.__enter__()
        self.made = 0
        self.live: list[ExecutionContext] = []
        self.dead: list[ExecutionContext] = []
        self.reserved: dict[ExecutionContext, int] = {}
        # (array, owning context or None for outside any session)
        self.arrays: list[tuple[Any, ExecutionContext | None]] = []
        self.evictables: list[tuple[Evictable, ExecutionContext]] = []
        self.sessions: list[tuple[context_session, ExecutionContext]] = []  # innermost last
        self.abandoned: list[context_session] = []  # ended by an outer session's exit
        self.handlers: list[Any] = []

    # -- helpers ----------------------------------------------------------------------
    def _settle(self) -> None:
        """Wait for tasks that outlived their caller (cancelled after launch)."""
        deadline = time.monotonic() + 10
        while any(sum(self.rt.policy.counts(c)) for c in self.live + self.dead):
            assert time.monotonic() < deadline, "tasks still queued or in flight after 10 s"
            time.sleep(0.001)

    def _owner(self) -> ExecutionContext | None:
        return self.sessions[-1][1] if self.sessions else None

    def _expect(self, exc: BaseException, owner: ExecutionContext | None) -> None:
        """An allocation in ``owner`` failed: only the documented reasons may say so."""
        if isinstance(exc, ContextClosed):
            assert owner is not None and owner in self.dead, exc
            event("refused: context closed")
        else:
            assert isinstance(exc, VRAMBudgetExceeded), repr(exc)
            event(f"refused: {exc.reason}" + (" (a handler raised)" if exc.__cause__ else ""))

    # -- contexts -----------------------------------------------------------------------
    @rule(
        tier=st.sampled_from([G, B, BE]),
        max_vram=st.sampled_from([4 * MB, 6 * MB, 12 * MB]),
        base=st.sampled_from([0, 2 * MB, 4 * MB]),
    )
    def create(self, tier: QoSPolicy, max_vram: int, base: int) -> None:
        name = f"c{self.made}"
        self.made += 1
        base_vram = min(base, max_vram) if tier is B else None
        reserve = max_vram if tier is G else (base_vram or 0)
        try:
            ctx = self.rt.create_context(name, max_vram=max_vram, base_vram=base_vram, qos=tier)
        except AdmissionRejected:
            event("admission rejected")
            # only when the reservation cannot fit beside the others (and what they hold)
            assert reserve > 0
            assert sum(self.reserved.values()) + reserve > CAPACITY - self._shared_held()
            return
        self.live.append(ctx)
        self.reserved[ctx] = reserve

    def _held(self) -> dict[ExecutionContext | None, int]:
        """What each context (``None``: outside any session) should be charged, by the
        model: its arrays, and its evictables while they are on the device."""
        held: dict[ExecutionContext | None, int] = {}
        for arr, owner in self.arrays:
            held[owner] = held.get(owner, 0) + _charged(arr.nbytes)
        for handle, owner in self.evictables:
            if handle.on_device:
                held[owner] = held.get(owner, 0) + _charged(handle.nbytes)
        return held

    def _shared_held(self) -> int:
        """Bytes held beyond reservations (bursts, BestEffort, unscoped), model-side."""
        return sum(
            n - min(n, self.reserved[c]) if c in self.reserved else n
            for c, n in self._held().items()
        )

    @precondition(lambda self: self.live)
    @rule(i=PICK)
    def destroy(self, i: int) -> None:
        ctx = self.live.pop(i % len(self.live))
        self.rt.destroy_context(ctx)
        self.dead.append(ctx)
        del self.reserved[ctx]

    # -- sessions -------------------------------------------------------------------------
    @precondition(lambda self: self.live or self.dead)
    @rule(i=PICK)
    def enter(self, i: int) -> None:
        every = self.live + self.dead
        ctx = every[i % len(every)]
        session = context_session(ctx)
        try:
            session.__enter__()
        except ContextClosed:
            assert ctx in self.dead
            return
        except VRAMBudgetExceeded:  # its evicted buffers could not be brought back
            assert any(o is ctx and not h.on_device for h, o in self.evictables)
            return
        self.sessions.append((session, ctx))

    @precondition(lambda self: self.sessions)
    @rule(i=PICK)
    def exit(self, i: int) -> None:
        k = i % len(self.sessions)
        session, _ = self.sessions[k]
        if k == len(self.sessions) - 1:
            session.__exit__(None, None, None)
            self.sessions.pop()
            return
        with pytest.raises(ContextError, match="sessions must end in the reverse order"):
            session.__exit__(None, None, None)
        event("misnested exit")
        self.abandoned += [s for s, _ in self.sessions[k + 1 :]]
        del self.sessions[k:]

    @precondition(lambda self: self.abandoned)
    @rule(i=PICK)
    def exit_abandoned(self, i: int) -> None:
        session = self.abandoned.pop(i % len(self.abandoned))
        session.__exit__(None, None, None)  # ended already: nothing to do

    # -- arrays ---------------------------------------------------------------------------
    @rule(nbytes=SIZES)
    def allocate(self, nbytes: int) -> None:
        owner = self._owner()
        try:
            arr = _alloc(self.rt, nbytes)
        except Exception as exc:
            self._expect(exc, owner)
            return
        assert arr.nbytes == nbytes
        self.arrays.append((arr, owner))

    @rule(shape=st.sampled_from([-1, -1_000_000, (4, -2), 2.5, (1, None)]))
    def allocate_bad_shape(self, shape: object) -> None:
        with pytest.raises((InvalidArgument, InvalidArgumentType)):
            self.rt.xp.zeros(shape)  # refused before anything is charged (invariants)

    @precondition(lambda self: self.arrays)
    @rule(i=PICK)
    def free(self, i: int) -> None:
        del self.arrays[i % len(self.arrays)]

    # -- tasks ----------------------------------------------------------------------------
    @precondition(lambda self: self.live or self.dead)
    @rule(i=PICK, nbytes=SIZES)
    def submit(self, i: int, nbytes: int) -> None:
        every = self.live + self.dead
        ctx = every[i % len(every)]

        async def run() -> Any:
            return await ctx.submit(_alloc, self.rt, nbytes)

        try:
            arr = self.portal.call(run)
        except Exception as exc:
            self._expect(exc, ctx)
        else:
            self.arrays.append((arr, ctx))
        self._settle()

    @precondition(lambda self: self.live)
    @rule(i=PICK, nbytes=SIZES, delay=st.sampled_from([0.0, 0.0005]))
    def submit_and_cancel(self, i: int, nbytes: int, delay: float) -> None:
        ctx = self.live[i % len(self.live)]

        async def run() -> None:
            with anyio.move_on_after(delay):
                with contextlib.suppress(VRAMBudgetExceeded):
                    await ctx.submit(_alloc_and_drop, self.rt, nbytes)

        self.portal.call(run)
        self._settle()

    # -- eviction -------------------------------------------------------------------------
    @precondition(lambda self: any(o is not None and o.qos is not G for _, o in self.arrays))
    @rule(i=PICK)
    def make_evictable(self, i: int) -> None:
        candidates = [k for k, (_, o) in enumerate(self.arrays) if o is not None and o.qos is not G]
        k = candidates[i % len(candidates)]
        arr, owner = self.arrays.pop(k)
        assert owner is not None
        try:
            handle = owner.evictable(arr)
        except ContextClosed:
            assert owner in self.dead
            self.arrays.append((arr, owner))
            return
        del arr
        self.evictables.append((handle, owner))

    @precondition(lambda self: any(c.qos is not G for c in self.live))
    @rule(i=PICK, nbytes=SIZES)
    def allocate_evictable(self, i: int, nbytes: int) -> None:
        """Weights loaded in a session of their own and handed over at once."""
        spillable = [c for c in self.live if c.qos is not G]
        ctx = spillable[i % len(spillable)]
        try:
            with context_session(ctx):
                handle = ctx.evictable(_alloc(self.rt, nbytes))
        except Exception as exc:
            self._expect(exc, ctx)
            return
        self.evictables.append((handle, ctx))

    @precondition(lambda self: any(c.qos is B for c in self.live))
    @rule(i=PICK, nbytes=SIZES)
    def burst(self, i: int, nbytes: int) -> None:
        """A Burstable context takes shared memory for a moment: BestEffort buffers may be
        evicted for it (unless their context is in a session)."""
        burstable = [c for c in self.live if c.qos is B]
        ctx = burstable[i % len(burstable)]
        try:
            with context_session(ctx):
                _alloc_and_drop(self.rt, nbytes)
        except Exception as exc:
            self._expect(exc, ctx)

    @precondition(lambda self: self.evictables)
    @rule(i=PICK)
    def read_evictable(self, i: int) -> None:
        handle, owner = self.evictables[i % len(self.evictables)]
        try:
            arr = handle.array  # brings it back if it was evicted
        except Exception as exc:
            self._expect(exc, owner)
            return
        assert arr.nbytes == handle.nbytes and handle.on_device
        del arr

    @precondition(lambda self: self.evictables)
    @rule(i=PICK, release=st.booleans())
    def drop_evictable(self, i: int, release: bool) -> None:
        handle, _ = self.evictables.pop(i % len(self.evictables))
        if release:
            handle.release()

    # -- pressure handlers ----------------------------------------------------------------
    @rule(kind=st.sampled_from(["yes", "no", "raise", "allocate"]))
    def add_handler(self, kind: str) -> None:
        rt = self.rt

        def handler(ctx: ExecutionContext | None, requested: int, available: int) -> bool:
            if kind == "raise":
                raise RuntimeError("handler failed")
            if kind == "allocate":  # in its own context, under the same pressure
                session = context_session(ctx) if ctx is not None else contextlib.nullcontext()
                with session:
                    _alloc_and_drop(rt, requested)
            return kind != "no"

        self.handlers.append(rt.on_memory_pressure(handler))

    @precondition(lambda self: self.handlers)
    @rule(i=PICK)
    def remove_handler(self, i: int) -> None:
        self.rt.remove_memory_pressure_handler(self.handlers.pop(i % len(self.handlers)))

    # -- invariants -----------------------------------------------------------------------
    @invariant()
    def charges_match_live_arrays(self) -> None:
        if any(not h.on_device for h, _ in self.evictables):
            event("an evictable is evicted")
        expected = self._held()
        for ctx in self.live + self.dead:
            usage = ctx.usage()
            want = expected.get(ctx, 0)
            assert (usage.used, usage.held) == (want, want), (ctx.name, usage, want)
        assert self.rt.ledger.unscoped.held == expected.get(None, 0)

    @invariant()
    def reservations_fit_the_capacity(self) -> None:
        total = self.rt.ledger.reserved_total()
        assert total == sum(self.reserved.values())
        assert total <= self.rt.ledger.capacity
        assert sum(c.usage().reserved for c in self.live) == total

    @invariant()
    def nothing_runs_for_a_destroyed_context(self) -> None:
        for ctx in self.dead:
            assert self.rt.policy.counts(ctx) == (0, 0)
        assert not [t for t in self.rt.policy.queued() if t.context in self.dead]

    @invariant()
    def the_innermost_session_is_bound(self) -> None:
        assert current_context() is self._owner()

    def teardown(self) -> None:
        try:
            for session, _ in reversed(self.sessions):
                session.__exit__(None, None, None)
            assert current_context() is None
            self.sessions.clear()
            self.arrays.clear()
            self.evictables.clear()
            gc.collect()
            for ctx in self.live + self.dead:
                assert (ctx.usage().used, ctx.usage().held) == (0, 0), ctx.usage()
            assert self.rt.ledger.unscoped.held == 0
        finally:
            self.rt.close()
            self._portal_cm.__exit__(None, None, None)


RuntimeMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRuntimeStates = RuntimeMachine.TestCase
