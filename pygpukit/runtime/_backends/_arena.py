"""A best-fit sub-allocator over one block taken up front: a Guaranteed context's memory.

Taking ``max_vram`` from the device at creation is what makes a Guaranteed reservation
physical: no other allocation in the process — ours or a library's — can use those bytes.
"""

from __future__ import annotations

import bisect

from ..._locks import BookkeepingLock

__all__ = ("Arena",)


class Arena:
    """Offsets into a region of ``size`` bytes; freed ranges coalesce with neighbours."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = [0]  # free ranges, sorted by offset
        self._lengths: dict[int, int] = {0: size}
        self._lock = BookkeepingLock()  # gives come from finalizers: see _locks
        self.used = 0

    def take(self, n: int) -> int | None:
        """The offset of ``n`` free bytes (smallest fitting range), or ``None``."""
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

    def give(self, offset: int, n: int) -> None:
        """Return ``n`` bytes at ``offset`` (from a finalizer: through ``_locks.give_back``)."""
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
