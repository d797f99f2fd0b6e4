"""The numbers of the memory ledger: what each account holds, reserves and may still get.

The ledger (``_ledger.py``) keeps the policy — pressure handlers, eviction, errors — and
keeps its numbers in a book. The native book (``_native.Book``, in C) is the one used where
the extension is built: PyTorch's allocator charges it from C, without the GIL, while it
holds its own allocator lock (docs/adr/0038). :class:`PyBook` is the same arithmetic in
Python, for a build without a C compiler; the tests run both.

An account's *available* bytes are what it can still charge now: its unused reservation
plus the device's unreserved, unheld remainder, never past its budget (``max_vram``).
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

__all__ = ("PyBook", "make_book", "native")

native: Any
try:
    native = importlib.import_module("pygpukit.runtime._native")
except ImportError:  # built without a C compiler
    native = None


class _Line:
    __slots__ = ("base_vram", "closed", "held", "max_vram", "peak", "reserved")

    def __init__(self, max_vram: int, base_vram: int, reserved: int) -> None:
        self.max_vram = max_vram
        self.base_vram = base_vram
        self.reserved = reserved
        self.held = 0
        self.peak = 0
        self.closed = False


class PyBook:
    """The book in Python: the methods of ``_native.Book``, with the same results."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lines: list[_Line | None] = []
        self._lock = threading.Lock()

    def _free(self) -> int:
        lines = [x for x in self._lines if x is not None]
        reserved = sum(x.reserved for x in lines)
        shared_used = sum(max(0, x.held - x.reserved) for x in lines)
        return max(0, self.capacity - reserved - shared_used)

    def _line(self, i: int) -> _Line:
        line = self._lines[i] if 0 <= i < len(self._lines) else None
        if line is None:
            raise ValueError(f"no open account {i} in this book")
        return line

    def _available(self, line: _Line) -> int:
        from_reservation = max(0, line.reserved - line.held)
        return max(0, min(line.max_vram - line.held, from_reservation + self._free()))

    def open(self, max_vram: int, base_vram: int, reserved: int) -> int:
        with self._lock:
            line = _Line(max_vram, base_vram, reserved)
            for i, old in enumerate(self._lines):
                if old is None:
                    self._lines[i] = line
                    return i
            self._lines.append(line)
            return len(self._lines) - 1

    def close(self, i: int) -> None:
        with self._lock:
            line = self._line(i)
            line.closed = True
            line.reserved = 0

    def drop(self, i: int) -> bool:
        with self._lock:
            line = self._line(i)
            if not line.closed or line.held:
                return False
            self._lines[i] = None
            return True

    def charge(self, i: int, n: int) -> int:
        with self._lock:
            line = self._line(i)
            if line.closed:
                return -1
            if n > self._available(line):
                return 0
            line.held += n
            line.peak = max(line.peak, line.held)
            return 1

    def release(self, i: int, n: int) -> None:
        with self._lock:
            self._line(i).held -= n

    def available(self, i: int) -> int:
        with self._lock:
            return self._available(self._line(i))

    def state(self, i: int) -> tuple[int, int, int, int, int, bool]:
        with self._lock:
            x = self._line(i)
            return (x.held, x.peak, x.reserved, x.max_vram, x.base_vram, x.closed)

    def totals(self) -> tuple[int, int, int]:
        with self._lock:
            reserved = sum(x.reserved for x in self._lines if x is not None)
            return (self.capacity, reserved, self._free())


def make_book(capacity: int, *, prefer_native: bool = True) -> Any:
    """The native book where the extension is built (and ``prefer_native``), else a PyBook."""
    if prefer_native and native is not None:
        return native.Book(capacity)
    return PyBook(capacity)
