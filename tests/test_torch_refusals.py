"""What a refused PyTorch allocation becomes, decided without PyTorch: the native book's
refusal reasons map to the runtime's errors, and the ledger's policy runs for it (pressure
handlers, eviction), saying when room was made."""

from __future__ import annotations

import functools

import pytest

from pygpukit import BudgetReason, ContextClosed, CudaError, QoSPolicy, VRAMBudgetExceeded
from pygpukit.runtime._backends._torch import TorchMemory
from pygpukit.runtime._book import native
from pygpukit.runtime._ledger import Ledger

MiB = 1 << 20

pytestmark = pytest.mark.skipif(native is None, reason="the native extension is not built")


def _memory(ledger: Ledger, name: str) -> tuple[TorchMemory, object]:
    account = next(a for a in ledger._accounts if a.name == name)
    relieve = functools.partial(ledger.relieve, account)
    return TorchMemory(name, ledger.book, account.id, 0, relieve), account


def test_each_refusal_reason_becomes_its_error() -> None:
    ledger = Ledger(100 * MiB)
    ledger.open("llm", QoSPolicy.BURSTABLE, 40 * MiB, 10 * MiB)
    memory, _ = _memory(ledger, "llm")
    over = memory.refused(native.REFUSED_BUDGET, 64 * MiB)
    assert isinstance(over, VRAMBudgetExceeded)
    assert over.reason is BudgetReason.MAX_VRAM
    assert "context 'llm' asked for 64 MiB" in str(over)
    closed = memory.refused(native.REFUSED_CLOSED, 1 * MiB)
    assert isinstance(closed, ContextClosed)
    device = memory.refused(native.REFUSED_DEVICE, 8 * MiB)
    assert isinstance(device, CudaError)
    assert "lower vram_limit" in str(device)
    assert memory.refused(native.REFUSED_UNBOUND, 1) is None


def test_relieve_runs_the_policy_and_says_when_room_was_made() -> None:
    ledger = Ledger(100 * MiB)
    batch = ledger.open("batch", QoSPolicy.BEST_EFFORT, 100 * MiB, 0)
    ledger.open("llm", QoSPolicy.BURSTABLE, 60 * MiB, 10 * MiB)
    ledger.grow(batch, 80 * MiB)  # BestEffort holds most of the shared memory
    evicted: list[int] = []

    def reclaim(want: int) -> int:  # what the eviction component does: free, then report
        ledger.shrink(batch, want)
        evicted.append(want)
        return want

    batch.reclaim = reclaim
    memory, llm = _memory(ledger, "llm")
    error = memory.refused(native.REFUSED_BUDGET, 30 * MiB)  # base 10 + shared 10 < 30
    assert isinstance(error, VRAMBudgetExceeded)
    assert evicted  # the Burstable burst evicted BestEffort, as a CuPy request would
    assert ledger.available(llm) >= 30 * MiB
    assert any("fits now" in note for note in error.__notes__)
