"""pygpukit.lowlevel.MemoryPool: quota, LRU eviction with real copies, exact stats."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pygpukit import (
    BudgetReason,
    InvalidArgument,
    InvalidArgumentType,
    VRAMBudgetExceeded,
    scheduler,
)
from pygpukit.lowlevel import Block, MemoryPool
from pygpukit.runtime import MemoryPool as RuntimeMemoryPool
from pygpukit.runtime import Runtime

BLOCK = 4096


def _fill(pool: MemoryPool, block, tag: int) -> bytes:  # type: ignore[no-untyped-def]
    data = bytes([tag]) * 16 + os.urandom(BLOCK - 16)
    pool.write(block, data)
    return data


def test_lru_evicts_the_least_recently_used_and_restores_it_intact(rt: Runtime) -> None:
    pool = MemoryPool(quota=3 * BLOCK, enable_eviction=True, runtime=rt)
    a, b, c = (pool.allocate(BLOCK) for _ in range(3))
    data = {blk.id: _fill(pool, blk, i) for i, blk in enumerate((a, b, c))}
    s = pool.stats()
    assert (s.device_bytes, s.host_bytes, s.evictions, s.allocations) == (3 * BLOCK, 0, 0, 3)

    pool.touch(a)  # A is now the most recent: B is the least
    d = pool.allocate(BLOCK)
    assert (a.on_device, b.on_device, c.on_device, d.on_device) == (True, False, True, True)
    s = pool.stats()
    assert (s.device_bytes, s.host_bytes, s.evictions, s.restores) == (3 * BLOCK, BLOCK, 1, 0)
    assert (s.active_blocks, s.evicted_blocks, s.allocated_bytes) == (3, 1, 4 * BLOCK)

    assert pool.read(b) == data[b.id]  # restored: the LRU of the rest (C) spills
    assert b.on_device and not c.on_device
    s = pool.stats()
    assert (s.evictions, s.restores, s.device_bytes, s.host_bytes) == (2, 1, 3 * BLOCK, BLOCK)
    assert pool.read(c) == data[c.id]
    assert pool.read(a) == data[a.id]


def test_free_and_reuse_keep_stats_exact(rt: Runtime) -> None:
    pool = MemoryPool(quota=2 * BLOCK, enable_eviction=True, runtime=rt)
    x, y = pool.allocate(BLOCK), pool.allocate(BLOCK)
    pool.free(x)
    s = pool.stats()
    assert (s.allocated_bytes, s.free_blocks, s.free_bytes, s.frees) == (BLOCK, 1, BLOCK, 1)
    z = pool.allocate(BLOCK)  # reuses x's device buffer
    s = pool.stats()
    assert (s.reuses, s.free_blocks, s.allocated_bytes, s.evictions) == (1, 0, 2 * BLOCK, 0)
    pool.allocate(BLOCK)  # evicts y (LRU), not z
    assert not y.on_device and z.on_device
    pool.free(y)  # freeing an evicted block drops its host copy
    s = pool.stats()
    assert (s.host_bytes, s.evicted_blocks, s.allocated_bytes) == (0, 0, 2 * BLOCK)
    with pytest.raises(ValueError, match="already freed"):
        pool.free(y)


def test_without_eviction_the_quota_is_a_hard_limit(rt: Runtime) -> None:
    pool = MemoryPool(quota=2 * BLOCK, enable_eviction=False, runtime=rt)
    pool.allocate(BLOCK)
    pool.allocate(BLOCK)
    before = pool.stats()
    with pytest.raises(
        VRAMBudgetExceeded,
        match=r"^a MemoryPool allocation asked for 4 KiB but only 0 B is available within its "
        r"MemoryPool quota of 8 KiB; free blocks, or create the pool with a larger quota or with "
        r"enable_eviction=True to spill to the host$",
    ) as info:
        pool.allocate(BLOCK)
    assert info.value.reason is BudgetReason.QUOTA
    assert pool.stats() == before


def test_pool_memory_is_charged_to_the_device_ledger(rt: Runtime) -> None:
    held = rt.ledger.unscoped.held
    pool = MemoryPool(quota=4 * BLOCK, runtime=rt)
    blk = pool.allocate(BLOCK)
    assert rt.ledger.unscoped.held == held + BLOCK
    pool.free(blk)
    pool.allocate(2 * BLOCK)  # drops the cached block to stay in quota? no: fits
    assert rt.ledger.unscoped.held == held + 3 * BLOCK


def test_the_seed_spelling_draws_from_the_default_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYGPUKIT_BACKEND", "host")
    pool = MemoryPool(quota=100 * 1024 * 1024, enable_eviction=True)
    rt = scheduler.get_runtime()
    held = rt.ledger.unscoped.held
    block = pool.allocate(4096)
    assert rt.ledger.unscoped.held == held + 4096  # charged to the default runtime's ledger
    pool.free(block)
    assert isinstance(pool, RuntimeMemoryPool)


def test_the_runtime_pool_is_handed_its_runtime(rt: Runtime) -> None:
    with pytest.raises(TypeError, match="runtime"):
        RuntimeMemoryPool(BLOCK)  # type: ignore[call-arg]
    with pytest.raises(
        InvalidArgumentType,
        match=r"^runtime must be a Runtime, not None; pass the Runtime to draw from$",
    ):
        RuntimeMemoryPool(BLOCK, runtime=None)  # type: ignore[arg-type]
    pool = RuntimeMemoryPool(np.int64(2 * BLOCK), runtime=rt)  # any integer type
    assert pool.quota == 2 * BLOCK and type(pool.quota) is int
    assert pool.allocate(np.int32(BLOCK)).size == BLOCK


def test_bad_arguments(rt: Runtime) -> None:
    with pytest.raises(
        InvalidArgumentType,
        match=r"^quota must be an integer number of bytes \(e\.g\. 4 \* GB\), not 1\.5$",
    ):
        MemoryPool(quota=1.5, runtime=rt)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"^quota must be positive, got 0; e\.g\. "):
        MemoryPool(quota=0, runtime=rt)
    pool = MemoryPool(quota=2 * BLOCK, runtime=rt)
    with pytest.raises(InvalidArgument, match=r"^size must be positive, got -1; "):
        pool.allocate(-1)
    with pytest.raises(InvalidArgumentType, match=r"^size must be an integer number of bytes "):
        pool.allocate("4096")  # type: ignore[arg-type]
    with pytest.raises(
        InvalidArgumentType,
        match=r"^block must be a Block, not 3; pass a Block from this pool's allocate\(\)$",
    ):
        pool.free(3)  # type: ignore[arg-type]
    mine = pool.allocate(BLOCK)
    other = MemoryPool(quota=2 * BLOCK, runtime=rt).allocate(BLOCK)
    assert isinstance(other, Block) and other.id == mine.id  # ids count from 1 in each pool
    with pytest.raises(
        InvalidArgument,
        match=rf"^block {other.id} belongs to another pool; use it with the pool that allocated",
    ):
        pool.touch(other)
