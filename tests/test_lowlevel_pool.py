"""pygpukit.lowlevel.MemoryPool: quota, LRU eviction with real copies, exact stats."""

from __future__ import annotations

import os

import pytest

from pygpukit import VRAMBudgetExceeded
from pygpukit.lowlevel import MemoryPool
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
    with pytest.raises(VRAMBudgetExceeded, match="enable_eviction=True"):
        pool.allocate(BLOCK)
    assert pool.stats() == before


def test_pool_memory_is_charged_to_the_device_ledger(rt: Runtime) -> None:
    held = rt.ledger.unscoped.held
    pool = MemoryPool(quota=4 * BLOCK, runtime=rt)
    blk = pool.allocate(BLOCK)
    assert rt.ledger.unscoped.held == held + BLOCK
    pool.free(blk)
    pool.allocate(2 * BLOCK)  # drops the cached block to stay in quota? no: fits
    assert rt.ledger.unscoped.held == held + 3 * BLOCK
