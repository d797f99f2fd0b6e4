"""The device's memory ledger: reservations, budgets, and pressure.

Every byte a pool takes from the device is charged here *before* it is taken
(:meth:`Ledger.grow`), and credited when it is given back (:meth:`Ledger.shrink`).
The ledger splits the device's capacity into reservations (a Guaranteed context's
``max_vram``, a Burstable context's ``base_vram``) and the shared remainder, from which
Burstable bursts, BestEffort contexts and allocations made outside any session are served.

A request that does not fit first drops cached free blocks (ours and everyone's: cached
blocks are not usage), then asks the memory-pressure handlers; when they all agree the
runtime collects garbage and tries once more. Nothing lifts a context past ``max_vram``.
Handlers are never re-entered: what a handler allocates is decided without them. A handler
that raises refuses, and its exception is the cause of the ``VRAMBudgetExceeded`` raised:
the caller always learns that the budget was exceeded, and why the handler could not help.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable
from typing import Any

from .._exceptions import (
    AdmissionRejected,
    BudgetReason,
    ContextClosed,
    InvalidArgument,
    VRAMBudgetExceeded,
)
from .._locks import BookkeepingLock
from ._book import make_book
from ._reservation import check_reservation
from ._tiers import QoSPolicy

__all__ = ("Account", "Ledger", "PressureHandler")

PressureHandler = Callable[[Any, int, int], bool]
"""``handler(ctx, requested, available) -> bool``: ``True`` lets the runtime make room."""


class Account:
    """One context's (or the unscoped allocations') line in the ledger.

    Its numbers live in the ledger's book (``id`` is its line there), where PyTorch's
    allocator charges them too; the rest is what the ledger's policy needs of the context.
    """

    __slots__ = (
        "_book",
        "charge_hook",
        "closed",
        "id",
        "name",
        "owner",
        "reclaim",
        "refusals",
        "release_hook",
        "tier",
        "trim",
    )

    def __init__(self, book: Any, id: int, name: str | None, tier: QoSPolicy | None) -> None:
        self._book = book
        self.id = id
        self.name = name
        self.tier = tier
        self.owner: Any = None
        self.trim: Callable[[], None] = _nothing
        self.reclaim: Callable[[int], int] = _none_freed
        self.charge_hook: Callable[[int], None] = _ignore  # partition memory limits
        self.release_hook: Callable[[int], None] = _ignore
        self.refusals = 0  # allocations refused with VRAMBudgetExceeded
        #: set by Ledger.close, the one place an account is closed (read on every free,
        #: so kept here rather than asked of the book)
        self.closed = False

    def state(self) -> tuple[int, int, int, int, int, bool]:
        """``(held, peak, reserved, max_vram, base_vram, closed)`` read at once."""
        return self._book.state(self.id)  # type: ignore[no-any-return]

    @property
    def held(self) -> int:
        """Bytes charged now (cached blocks included: they occupy the device)."""
        return int(self._book.state(self.id)[0])

    @property
    def peak(self) -> int:
        return int(self._book.state(self.id)[1])

    @property
    def reserved(self) -> int:
        """Bytes reserved now (0 once closed)."""
        return int(self._book.state(self.id)[2])

    @property
    def max_vram(self) -> int:
        """The budget: the one place it is kept is the book."""
        return int(self._book.state(self.id)[3])

    @property
    def base_vram(self) -> int:
        """Burstable: its reserved base."""
        return int(self._book.state(self.id)[4])


class _Final:
    """The book of an account the ledger has forgotten: its last numbers."""

    __slots__ = ("_state",)

    def __init__(self, state: tuple[int, int, int, int, int, bool]) -> None:
        self._state = state

    def state(self, id: int) -> tuple[int, int, int, int, int, bool]:
        return self._state


def _ignore(nbytes: int) -> None:
    return None


def _nothing() -> None:
    return None


def _none_freed(want: int) -> int:
    return 0


def _name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or repr(fn))


class Ledger:
    """Thread-safe accounting of one device's memory (see the module docstring)."""

    def __init__(self, capacity: int, *, native: bool = True) -> None:
        self.capacity = capacity
        # the numbers, shared with PyTorch's allocator where the native book is built
        self.book = make_book(capacity, prefer_native=native)
        # reentrant: trim() frees blocks, which re-enters shrink(); finalizers: see _locks
        self._lock = BookkeepingLock(reentrant=True)
        self._accounts: list[Account] = []
        self.unscoped = Account(self.book, self.book.open(capacity, 0, 0), None, None)
        self._accounts.append(self.unscoped)
        self.handlers: list[PressureHandler] = []
        self.rejections = 0  # reservations refused with AdmissionRejected
        # whether this thread is running handlers now: their own allocations skip them
        self._consulting = threading.local()

    # -- derived totals -------------------------------------------------------------------
    def _shared_free(self) -> int:
        return int(self.book.totals()[2])

    def _available(self, a: Account) -> int:
        return int(self.book.available(a.id))

    # -- queries ------------------------------------------------------------------------
    def available(self, account: Account | None = None) -> int:
        """What ``account`` could still get; with no account, the unreserved free memory."""
        return self._shared_free() if account is None else self._available(account)

    def reserved_total(self) -> int:
        return int(self.book.totals()[1])

    def reservable(self) -> int:
        """Memory a new reservation could take now."""
        return self._shared_free()

    # -- accounts -----------------------------------------------------------------------
    def open(self, name: str, tier: QoSPolicy, max_vram: int, base_vram: int) -> Account:
        """Open an account, reserving what its tier promises.

        :raises AdmissionRejected: the reservation does not fit the unreserved memory
        """
        reserve = tier.reservation(max_vram, base_vram)
        with self._lock:
            short = reserve - self._shared_free()
        if short > 0:
            self._drop_caches()
            self._make_room(tier, short)
        with self._lock:
            knob = "max_vram" if tier is QoSPolicy.GUARANTEED else "base_vram"
            verdict = check_reservation(
                reserve, self._shared_free(), self.capacity, tier=tier, knob=knob
            )
            if not verdict.fits:
                self.rejections += 1
                raise AdmissionRejected(f"context {name!r}", verdict.reason)
            account = Account(self.book, self.book.open(max_vram, base_vram, reserve), name, tier)
            self._accounts.append(account)
            return account

    def close(self, account: Account) -> None:
        """Release the account's reservation; bytes still held stay charged until freed."""
        with self._lock:
            self.book.close(account.id)
            account.closed = True
            self._forget_idle()

    def _forget_idle(self) -> None:
        """Drop the closed accounts that hold nothing (PyTorch's frees, charged in C, do not
        pass through :meth:`shrink`)."""
        for a in [a for a in self._accounts if a is not self.unscoped]:
            if a.closed:
                self._drop(a)

    def _drop(self, a: Account) -> None:
        """Forget closed ``a`` if it holds nothing: its line in the book may then be reused,
        so the account keeps its last numbers."""
        last = self.book.state(a.id)
        if self.book.drop(a.id):
            a._book = _Final(last)
            self._accounts.remove(a)

    # -- charging -----------------------------------------------------------------------
    def _try(self, a: Account, n: int) -> bool:
        with self._lock:
            # closed, or closed and forgotten (its line in the book may be another's now)
            charged = self.book.charge(a.id, n) if a._book is self.book else -1
            if charged < 0:
                raise ContextClosed(a.name or "<unscoped>")
            if not charged:
                return False
            try:
                a.charge_hook(n)  # a partition over its memory limit raises here
            except BaseException:
                self.book.release(a.id, n)
                raise
            return True

    def grow(self, a: Account, n: int) -> None:
        """Charge ``n`` new bytes to ``a`` or raise.

        The memory-pressure handlers are consulted at most once per request and never
        re-entered: an allocation a handler makes (on its thread, while handlers run) is
        decided by the tiers' own policy, without asking the handlers again. A handler that
        raises counts as a refusal; the error raised then is the budget error, with the
        handler's exception as its ``__cause__`` and a note naming the handler.

        :raises VRAMBudgetExceeded: the bytes do not fit, after making room
        :raises ContextClosed: the account's context was destroyed
        :raises InvalidArgument: ``n`` is negative
        """
        if n < 0:  # a negative charge would credit the account: refuse it before any change
            raise InvalidArgument(f"cannot charge a negative number of bytes ({n})")
        if self._try(a, n):
            return
        error = self._settle(a, n, self._try)
        if error is not None:
            raise error

    def relieve(self, a: Account, n: int) -> VRAMBudgetExceeded:
        """The error for ``n`` bytes refused to ``a`` elsewhere (by PyTorch's allocator, which
        charges the book in C and cannot wait for this policy), after running the policy
        :meth:`grow` runs — handlers, cached memory, eviction — so that a retry can fit."""
        error = self._settle(a, n, self._fits)
        if error is None:
            error = VRAMBudgetExceeded(
                a.name, n, self._available(a), a.max_vram, BudgetReason.UNRESERVED, tier=a.tier
            )
            error.add_note(
                "room has been made since the allocation was refused (cached memory given "
                "back, lower tiers evicted): the same allocation fits now"
            )
            a.refusals += 1
        return error

    def _fits(self, a: Account, n: int) -> bool:
        return not a.closed and self._available(a) >= n

    def _settle(
        self, a: Account, n: int, attempt: Callable[[Account, int], bool]
    ) -> VRAMBudgetExceeded | None:
        """Make room for ``n`` bytes and ``attempt`` them; ``None`` once an attempt succeeds,
        else the budget error (with a raising handler's exception as its cause)."""
        self._drop_caches()
        if attempt(a, n):
            return None
        with self._lock:
            available = self._available(a)
            over_budget = a.held + n > a.max_vram
        refuser, failure = self._consult(a, n, available)
        if refuser is None and not over_budget:
            gc.collect()
            self._drop_caches()
            if attempt(a, n):
                return None
            with self._lock:
                short = n - self._available(a)
            if self._make_room(a.tier, short) and attempt(a, n):
                return None
            with self._lock:
                available = self._available(a)
        if over_budget:
            error = VRAMBudgetExceeded(a.name, n, available, a.max_vram, BudgetReason.MAX_VRAM)
        elif refuser is not None:
            error = VRAMBudgetExceeded(
                a.name, n, available, a.max_vram, BudgetReason.HANDLER, handler=refuser
            )
        else:
            error = VRAMBudgetExceeded(
                a.name, n, available, a.max_vram, BudgetReason.UNRESERVED, tier=a.tier
            )
        if failure is not None:
            error.add_note(
                f"the memory-pressure handler {_name(refuser)} raised "
                f"{failure!r}; it counts as a refusal (see the exception's cause)"
            )
            error.__cause__ = failure
            error.__suppress_context__ = True
        a.refusals += 1
        return error

    def _consult(
        self, a: Account, n: int, available: int
    ) -> tuple[PressureHandler | None, Exception | None]:
        """Ask the handlers in turn; ``(the one that refused or raised, what it raised)``.

        ``(None, None)`` when all agree, when there are none, and for a request made while
        this thread is already running handlers (no handler is re-entered)."""
        if getattr(self._consulting, "active", False) or not self.handlers:
            return None, None
        self._consulting.active = True
        try:
            for handler in list(self.handlers):
                try:
                    agreed = handler(a.owner, n, available)
                except Exception as exc:
                    return handler, exc
                if not agreed:
                    return handler, None
            return None, None
        finally:
            self._consulting.active = False

    def shrink(self, a: Account, n: int) -> None:
        with self._lock:
            self.book.release(a.id, n)
            try:
                a.release_hook(n)
            except Exception:  # runs in finalizers: a partition gone since must not leak
                pass
            if a.closed and a in self._accounts:
                self._drop(a)

    def _make_room(self, tier: QoSPolicy | None, need: int) -> int:
        """Evict buffers of lower tiers — BestEffort first, then Burstable bursts (down to
        their base) — until ``need`` bytes are freed; returns the bytes freed. A tier takes
        memory only from tiers of a higher rank; unscoped allocations from none."""
        rank = 3 if tier is None else tier.rank
        with self._lock:
            best_effort = [a for a in self._accounts if a.tier is QoSPolicy.BEST_EFFORT]
            burstable = [a for a in self._accounts if a.tier is QoSPolicy.BURSTABLE]
        freed = 0
        if rank < QoSPolicy.BEST_EFFORT.rank:
            for victim in best_effort:
                if freed >= need:
                    return freed
                freed += victim.reclaim(need - freed)
        if rank < QoSPolicy.BURSTABLE.rank:
            for victim in burstable:
                if freed >= need:
                    return freed
                burst = max(0, victim.held - victim.reserved)
                if burst:
                    freed += victim.reclaim(min(need - freed, burst))
        return freed

    def _drop_caches(self) -> None:
        with self._lock:
            trims = [a.trim for a in self._accounts]
        for trim in trims:
            trim()
