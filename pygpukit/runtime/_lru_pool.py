"""The seed's standalone memory pool: a device-memory quota with LRU eviction to the host.

With eviction enabled, an allocation that would pass the quota spills the least recently
used blocks to host memory — their bytes really copied out — and brings them back, intact,
the next time they are touched, read or written. Its device memory is charged to the
runtime's ledger like any other allocation outside a session.

The pool is handed its runtime; :class:`pygpukit.lowlevel.MemoryPool`, the seed's spelling,
defaults it to the process-wide one.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .._exceptions import BudgetReason, InvalidArgument, VRAMBudgetExceeded
from ._runtime import Runtime
from .checks import check_bytes, check_instance

__all__ = ("Block", "MemoryPool", "PoolStats")

_ALIGN = 256


@dataclass(frozen=True)
class PoolStats:
    """Counters of a :class:`MemoryPool`, exact at the moment they were taken.

    :ivar allocated_bytes: bytes of live blocks, wherever they are
    :ivar device_bytes: bytes of live blocks on the device
    :ivar host_bytes: bytes of live blocks evicted to the host
    :ivar free_blocks: freed blocks kept on the device for reuse
    :ivar free_bytes: bytes of those cached free blocks
    """

    quota: int
    allocated_bytes: int
    device_bytes: int
    host_bytes: int
    active_blocks: int
    evicted_blocks: int
    free_blocks: int
    free_bytes: int
    allocations: int
    frees: int
    reuses: int
    evictions: int
    restores: int


class Block:
    """A block of a :class:`MemoryPool`. ``on_device`` is ``False`` while it is evicted."""

    __slots__ = ("_buf", "_host", "_rounded", "freed", "id", "size")

    def __init__(self, block_id: int, size: int, rounded: int, buf: Any) -> None:
        self.id = block_id
        self.size = size
        self._rounded = rounded
        self._buf: Any = buf
        self._host: Any = None
        self.freed = False

    @property
    def on_device(self) -> bool:
        return self._buf is not None

    def __repr__(self) -> str:
        where = "freed" if self.freed else ("device" if self.on_device else "host")
        return f"<Block id={self.id} size={self.size} on={where}>"


class MemoryPool:
    """A quota of device memory handing out :class:`Block` objects.

    :param quota: device bytes the pool may hold (live blocks plus cached free ones; any
        integer type)
    :param enable_eviction: spill LRU blocks to host memory instead of failing
    :param runtime: whose device, and whose ledger its memory is charged to
    :raises InvalidArgumentType: ``quota`` is not an integer, or ``runtime`` not a Runtime
    :raises InvalidArgument: ``quota`` is not positive
    """

    def __init__(self, quota: int, enable_eviction: bool = False, *, runtime: Runtime) -> None:
        self.quota = check_bytes(quota, "quota")
        self._rt = check_instance(runtime, Runtime, "runtime", "pass the Runtime to draw from")
        self._backend = runtime.backend
        self.enable_eviction = bool(enable_eviction)
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._lru: OrderedDict[int, Block] = OrderedDict()  # on-device live blocks, LRU first
        self._evicted: dict[int, Block] = {}
        self._cache: dict[int, list[Any]] = {}  # rounded size -> free device buffers
        self._device = 0  # live blocks on device
        self._cached = 0  # cached free buffers
        self._host = 0
        self._n = dict.fromkeys(("allocations", "frees", "reuses", "evictions", "restores"), 0)

    # -- device memory ------------------------------------------------------------------
    def _take(self, rounded: int, keep: Block | None) -> Any:
        """A device buffer of ``rounded`` bytes, making room within the quota first."""
        free = self._cache.get(rounded)
        if free:
            self._cached -= rounded
            self._n["reuses"] += 1
            return free.pop()
        while self._device + self._cached + rounded > self.quota:
            if self._cached:
                self._drop_cache()
                continue
            victim = next((b for b in self._lru.values() if b is not keep), None)
            if not self.enable_eviction or victim is None:
                raise VRAMBudgetExceeded(
                    None,
                    rounded,
                    max(0, self.quota - self._device - self._cached),
                    self.quota,
                    BudgetReason.QUOTA,
                )
            self._evict(victim)
        ledger = self._rt.ledger
        ledger.grow(ledger.unscoped, rounded)
        try:
            return self._backend.alloc_raw(rounded)
        except BaseException:
            ledger.shrink(ledger.unscoped, rounded)
            raise

    def _give(self, buf: Any, rounded: int) -> None:
        del buf  # the backend frees it when the last reference goes
        ledger = self._rt.ledger
        ledger.shrink(ledger.unscoped, rounded)

    def _drop_cache(self) -> None:
        for rounded, bufs in self._cache.items():
            while bufs:
                self._give(bufs.pop(), rounded)
                self._cached -= rounded
        self._cache.clear()

    def _evict(self, block: Block) -> None:
        block._host = self._backend.copy_to_host(block._buf, block._rounded)
        del self._lru[block.id]
        self._evicted[block.id] = block
        self._give(block._buf, block._rounded)
        block._buf = None
        self._device -= block._rounded
        self._host += block._rounded
        self._n["evictions"] += 1

    def _restore(self, block: Block) -> None:
        buf = self._take(block._rounded, keep=block)
        self._backend.copy_from_host(buf, block._host, block._rounded)
        block._buf, block._host = buf, None
        del self._evicted[block.id]
        self._lru[block.id] = block
        self._device += block._rounded
        self._host -= block._rounded
        self._n["restores"] += 1

    # -- public API ---------------------------------------------------------------------
    def allocate(self, size: int) -> Block:
        """A new block of ``size`` bytes, most recently used.

        :raises VRAMBudgetExceeded: it does not fit the quota (and eviction is off)
        :raises InvalidArgumentType: ``size`` is not an integer
        :raises InvalidArgument: ``size`` is not positive, or more than the quota
        """
        size = check_bytes(size, "size")
        rounded = -(-size // _ALIGN) * _ALIGN
        if rounded > self.quota:
            raise InvalidArgument(
                f"a {size}-byte block can never fit this pool's quota of {self.quota} bytes; "
                "raise the quota or allocate smaller blocks"
            )
        with self._lock:
            buf = self._take(rounded, keep=None)
            block = Block(next(self._ids), size, rounded, buf)
            self._lru[block.id] = block
            self._device += rounded
            self._n["allocations"] += 1
            return block

    def _live(self, block: Block) -> Block:
        check_instance(block, Block, "block", "pass a Block from this pool's allocate()")
        if block.freed:
            raise InvalidArgument(f"block {block.id} was already freed; free() each block once")
        # by identity: ids count from 1 in every pool
        if self._lru.get(block.id) is not block and self._evicted.get(block.id) is not block:
            raise InvalidArgument(
                f"block {block.id} belongs to another pool; use it with the pool that allocated it"
            )
        return block

    def free(self, block: Block) -> None:
        """Return ``block``; its device buffer is cached for reuse within the quota."""
        with self._lock:
            self._live(block)
            block.freed = True
            if block.on_device:
                del self._lru[block.id]
                self._device -= block._rounded
                self._cache.setdefault(block._rounded, []).append(block._buf)
                self._cached += block._rounded
                block._buf = None
            else:
                del self._evicted[block.id]
                self._host -= block._rounded
                block._host = None
            self._n["frees"] += 1

    def touch(self, block: Block) -> None:
        """Mark ``block`` most recently used, restoring it to the device if evicted."""
        with self._lock:
            self._live(block)
            if not block.on_device:
                self._restore(block)
            self._lru.move_to_end(block.id)

    def read(self, block: Block) -> bytes:
        """The block's bytes (restoring it first if it was evicted)."""
        with self._lock:
            self.touch(block)
            host = self._backend.copy_to_host(block._buf, block._rounded)
            return bytes(memoryview(host)[: block.size])

    def write(self, block: Block, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at the start of the block (restoring it first if evicted)."""
        check_instance(block, Block, "block", "pass a Block from this pool's allocate()")
        view = memoryview(data).cast("B")
        if view.nbytes > block.size:
            raise InvalidArgument(
                f"{view.nbytes} bytes do not fit block {block.id} of {block.size} bytes; "
                "write at most its size, or allocate a larger block"
            )
        with self._lock:
            self.touch(block)
            padded = bytearray(block._rounded)
            padded[: view.nbytes] = view
            if view.nbytes < block._rounded:  # keep the bytes past the written part
                old = self._backend.copy_to_host(block._buf, block._rounded)
                padded[view.nbytes :] = memoryview(old)[view.nbytes :]
            self._backend.copy_from_host(block._buf, padded, block._rounded)

    def stats(self) -> PoolStats:
        with self._lock:
            return PoolStats(
                quota=self.quota,
                allocated_bytes=self._device + self._host,
                device_bytes=self._device,
                host_bytes=self._host,
                active_blocks=len(self._lru),
                evicted_blocks=len(self._evicted),
                free_blocks=sum(len(v) for v in self._cache.values()),
                free_bytes=self._cached,
                **self._n,
            )

    def __repr__(self) -> str:
        s = self.stats()
        return (
            f"<MemoryPool quota={s.quota} device={s.device_bytes} host={s.host_bytes} "
            f"free_blocks={s.free_blocks} eviction={'on' if self.enable_eviction else 'off'}>"
        )
