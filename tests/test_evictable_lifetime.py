"""An evictable's buffer lives as long as its handle, in a destroyed context too."""

from __future__ import annotations

import gc

from pygpukit import MB, QoSPolicy, context_session
from pygpukit.runtime import Runtime


def test_a_dropped_handle_frees_its_buffer(host_rt: Runtime) -> None:
    be = host_rt.create_context("be", max_vram=16 * MB, qos=QoSPolicy.BEST_EFFORT)
    with context_session(be):
        handle = be.evictable(host_rt.xp.empty(4 * MB, dtype="uint8"))
    assert be.usage().used == 4 * MB
    del handle  # nobody can read it again: its bytes go, as an array's do
    assert be.usage().used == 0


def test_a_destroyed_context_with_a_dropped_handle_is_freed(host_rt: Runtime) -> None:
    be = host_rt.create_context("be", max_vram=16 * MB, qos=QoSPolicy.BEST_EFFORT)
    with context_session(be):
        handle = be.evictable(host_rt.xp.empty(4 * MB, dtype="uint8"))
        kept = be.evictable(host_rt.xp.ones(MB, dtype="uint8"))
    host_rt.destroy_context(be)
    del handle
    account = be._account
    assert (be.usage().used, account.held) == (MB, MB)  # what a live handle holds stays
    assert int(kept.array.sum()) == MB  # and can still be read
    del kept
    gc.collect()
    assert account.held == 0
    assert account not in host_rt.ledger._accounts  # the destroyed context is let go
