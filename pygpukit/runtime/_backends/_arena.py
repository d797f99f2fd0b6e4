"""A Guaranteed context's memory: one block taken up front, carved by a best-fit arena.

Taking ``max_vram`` from the device at creation is what makes a Guaranteed reservation
physical: no other allocation in the process — ours or a library's — can use those bytes.
:class:`ArenaPool` is what both backends' context pools share: the charge of every byte
through ``grow``/``shrink``, and for a reservation the arena its allocations are carved from.
"""

from __future__ import annotations

import bisect
from typing import Any

from ..._exceptions import BudgetReason, InvalidArgument, VRAMBudgetExceeded
from ..._locks import BookkeepingLock
from ._base import Grower, RawPool, Shrinker

__all__ = ("Arena", "ArenaPool", "fragmented")


class Arena:
    """Offsets into a region of ``size`` bytes; freed ranges coalesce with neighbours.

    :param size: bytes of the region
    :param label: the context the region is reserved for (named in its errors)
    """

    def __init__(self, size: int, label: str | None = None) -> None:
        self.size = size
        self.label = label
        self._starts: list[int] = [0]  # free ranges, sorted by offset
        self._lengths: dict[int, int] = {0: size}
        self._lock = BookkeepingLock()  # gives come from finalizers: see pygpukit._locks
        self.used = 0

    def take(self, n: int) -> int | None:
        """The offset of ``n`` free bytes (smallest fitting range), or ``None``.

        :raises InvalidArgument: ``n`` is not positive (a range of no bytes or fewer would
            corrupt the free list)
        """
        if n <= 0:
            raise InvalidArgument(f"an arena range must be at least one byte long, not {n}")
        with self._lock:
            best = None
            for start in self._starts:
                length = self._lengths[start]
                if length >= n and (best is None or length < self._lengths[best]):
                    best = start
                    if length == n:
                        break
            if best is None:
                return None
            length = self._lengths.pop(best)
            self._starts.remove(best)
            if length > n:
                rest = best + n
                bisect.insort(self._starts, rest)
                self._lengths[rest] = length - n
            self.used += n
            return best

    def carve(self, n: int) -> int:
        """The offset of ``n`` free bytes (smallest fitting range).

        :raises VRAMBudgetExceeded: no free range is that long (:meth:`fragmented`)
        """
        offset = self.take(n)
        if offset is None:
            raise self.fragmented(n)
        return offset

    def give(self, offset: int, n: int) -> None:
        """Return ``n`` bytes at ``offset`` (from a finalizer: through ``give_back``)."""
        with self._lock:
            self.used -= n
            i = bisect.bisect_left(self._starts, offset)
            # merge with the following range
            if i < len(self._starts) and self._starts[i] == offset + n:
                n += self._lengths.pop(self._starts.pop(i))
            # merge with the preceding range
            if i > 0:
                prev = self._starts[i - 1]
                if prev + self._lengths[prev] == offset:
                    self._lengths[prev] += n
                    return
            self._starts.insert(i, offset)
            self._lengths[offset] = n

    @property
    def largest_free(self) -> int:
        with self._lock:
            return max(self._lengths.values(), default=0)

    def fragmented(self, n: int) -> VRAMBudgetExceeded:
        """The error for ``n`` bytes that the budget has room for but no free range does."""
        return fragmented(self.label, n, self.largest_free, self.size)


def fragmented(label: str | None, n: int, largest_free: int, size: int) -> VRAMBudgetExceeded:
    """The error for ``n`` bytes that a reservation's budget has room for but no free range
    of its arena does (``largest_free`` is the longest)."""
    return VRAMBudgetExceeded(label, n, largest_free, size, BudgetReason.FRAGMENTED)


class ArenaPool(RawPool):
    """The bookkeeping both backends' context pools share.

    Every byte of device memory the pool takes is announced to ``grow`` first and every byte
    it gives back is reported to ``shrink``; with ``arena_bytes`` (a Guaranteed context),
    its allocations are carved from an :class:`Arena` over one block, ``_base``, that the
    backend's pool takes up front.
    """

    def __init__(self, grow: Grower, shrink: Shrinker, arena_bytes: int, label: str | None) -> None:
        self._grow = grow
        self._shrink = shrink
        self._label = label
        self._arena: Any = Arena(arena_bytes, label) if arena_bytes else None
        self._base: Any = None  # the arena's block of device memory, set by the backend

    def _give(self, offset: int, size: int) -> None:
        """A carved range is free again: back to the arena, then off the budget."""
        assert self._arena is not None
        self._arena.give(offset, size)
        self._shrink(size)

    def close(self) -> None:
        self.release_cached()
        self._base = None  # live allocations keep it alive until they die
