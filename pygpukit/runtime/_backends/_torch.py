"""PyTorch inside contexts: its CUDA allocations charged to the context's budget.

PyTorch's caching allocator takes a pool per (context, thread): a ``torch.cuda.MemPool``
whose allocator is pygpukit's (``_memory.c``: ``pygpukit_torch_alloc``/``_free``), entered on
the thread at every task step of the context and left afterwards (a pool routes one thread's
allocations, and PyTorch refuses one pool recording on two threads at once). PyTorch asks it
for whole segments and caches blocks in them; the segments are charged to the context's
account in the native book, the same numbers CuPy's allocations are charged to — from C and
without the GIL, since PyTorch calls it holding its allocator lock (docs/adr/0038). A
Guaranteed context's segments are carved from its reservation's arena.

A refusal is ``NULL``: PyTorch frees the pool's cached blocks, tries once more, calls its
out-of-memory observers with its lock released, and raises ``torch.OutOfMemoryError``. The
observer here runs the ledger's policy for the request (memory-pressure handlers, eviction of
lower tiers) and keeps the budget error it ends with; :func:`translate` turns the
``OutOfMemoryError`` into that error — a :class:`~pygpukit.VRAMBudgetExceeded` that is also a
``torch.OutOfMemoryError`` — where it leaves a task (``submit``) or a session.

This module imports torch only when torch is already imported: nothing here runs for a
process that does not use it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ..._exceptions import ContextClosed, CudaError, VRAMBudgetExceeded
from .._book import native

__all__ = ("TorchMemory", "torch_ready", "translate", "why_not")

_log = logging.getLogger("pygpukit")

_ALLOC, _FREE = "pygpukit_torch_alloc", "pygpukit_torch_free"
_OUT_OF_MEMORY = 2  # CUDA's out-of-memory status (runtime and driver alike)
_API = (
    "_cuda_beginAllocateCurrentThreadToPool",
    "_cuda_endAllocateToPool",
    "_cuda_releasePool",
    "_cuda_attach_out_of_memory_observer",
)

Relieve = Callable[[int], VRAMBudgetExceeded]
"""``relieve(nbytes)``: run the ledger's policy for a refused request; the error to raise."""


class _Process:
    """What every context's pools share: PyTorch's allocator object on our functions, and
    whether PyTorch can be governed at all (decided once, when torch is first seen)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.decided = False
        self.torch: Any = None  # the module, once governed
        self.allocator: Any = None
        self.why_not = ""
        # .memory, .pool: the TorchMemory routed to on this thread and its pool; .error:
        # the budget error of this thread's last refused allocation, until translated
        self.local = threading.local()
        self.error_class: type[VRAMBudgetExceeded] | None = None


_P = _Process()


def torch_ready() -> Any:
    """The torch module if PyTorch is imported and its allocations can be charged, else
    ``None`` (said once in the log, with the reason and the fix). Decided once per
    process: the allocator and the out-of-memory observer serve every device."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    if _P.decided:
        return _P.torch
    with _P.lock:
        if not _P.decided:
            _P.torch = _govern(torch)
            _P.decided = True
    return _P.torch


def why_not() -> str:
    """Why PyTorch's allocations are not charged (empty while they are, or undecided)."""
    return _P.why_not


def _govern(torch: Any) -> Any:
    reason = ""
    if native is None:
        reason = "pygpukit's native extension is not built (install it with a C compiler)"
    elif not torch.cuda.is_available():
        reason = (
            "this PyTorch has no CUDA (a CPU-only build, or no GPU visible to it); install a "
            "CUDA build of torch that matches the driver"
        )
    elif not all(hasattr(torch._C, name) for name in _API) or not hasattr(torch.cuda, "MemPool"):
        reason = (
            f"PyTorch {torch.__version__} lacks per-thread memory pools; pygpukit charges "
            "PyTorch's allocations from torch 2.8 on: upgrade torch"
        )
    if reason:
        _P.why_not = reason
        _log.warning("PyTorch's CUDA allocations are not charged to contexts: %s", reason)
        return None
    try:
        torch.cuda.init()  # before the first pool: a pool is made on an initialized device
        pluggable = torch.cuda.memory.CUDAPluggableAllocator(native.__file__, _ALLOC, _FREE)
        _P.allocator = pluggable.allocator()
        torch._C._cuda_attach_out_of_memory_observer(_on_out_of_memory)
    except Exception as exc:  # a broken install must not break every task step
        _P.why_not = f"setting up PyTorch's pools failed: {exc!r}"
        _log.warning("PyTorch's CUDA allocations are not charged to contexts: %s", _P.why_not)
        return None
    _P.error_class = type(
        "VRAMBudgetExceeded",
        (VRAMBudgetExceeded, torch.OutOfMemoryError),
        {
            "__module__": "pygpukit",
            "__doc__": "A VRAMBudgetExceeded raised for a PyTorch allocation: also a "
            "torch.OutOfMemoryError, so code that catches PyTorch's out-of-memory error "
            "catches it too.",
        },
    )
    return torch


def _on_out_of_memory(device: int, requested: int, allowed: int, free: int) -> None:
    """PyTorch's out-of-memory observer: runs on the allocating thread, with PyTorch's
    allocator lock released (so the ledger's policy may free PyTorch memory)."""
    refusal = native.last_refusal()
    memory = getattr(_P.local, "memory", None)
    if refusal is None or memory is None:
        return  # the device itself is out of memory: PyTorch's own error says so
    why, nbytes, _account = refusal
    try:
        _P.local.error = memory.refused(why, nbytes)
    except Exception as exc:  # the observer must not raise into PyTorch's allocator
        _log.warning("translating a refused PyTorch allocation failed: %r", exc)


def translate(exc: BaseException) -> BaseException:
    """The budget error behind ``exc`` when it is PyTorch's out-of-memory error for a
    refused allocation on this thread; otherwise ``exc``."""
    error: BaseException | None = getattr(_P.local, "error", None)
    if error is None or _P.torch is None or not isinstance(exc, _P.torch.OutOfMemoryError):
        return exc
    _P.local.error = None
    if error.__cause__ is None:
        error.__cause__ = exc
    return error


class TorchMemory:
    """One context's PyTorch memory: a pool per thread on pygpukit's allocator.

    :param name: the context's name (for errors)
    :param book: the ledger's native book
    :param account: the context's line in it
    :param device_id: the device of the context's stream
    :param relieve: the ledger's policy for a refused request (see :data:`Relieve`)
    """

    def __init__(
        self, name: str, book: Any, account: int, device_id: int, relieve: Relieve
    ) -> None:
        self._name = name
        self._book = book
        self._account = account
        self._device = device_id
        self._relieve = relieve
        self._pools: dict[int, Any] = {}  # thread ident -> torch.cuda.MemPool
        self._active: dict[int, int] = {}  # thread ident -> how many enters are open
        self._lock = threading.Lock()
        self._used = False  # whether a pool was ever made (a trim has something to do)

    def enter(self, torch: Any) -> tuple[Any, Any, Any] | None:
        """Route this thread's PyTorch allocations to the context; the token for leave().

        Nested in another context's routing on this thread (a task run inline inside a
        session step), that routing is suspended until leave(): PyTorch routes a thread's
        allocation to the first pool that claims it, which would be the outer one.
        """
        outer = getattr(_P.local, "memory", None)
        if outer is self:
            return None  # already routed here
        _P.local.error = None  # a refusal the code caught itself is not this step's
        tid = threading.get_ident()
        pool = self._pools.get(tid)
        if pool is None:
            pool = self._new_pool(torch, tid)
        with self._lock:
            self._active[tid] = self._active.get(tid, 0) + 1
        if outer is not None:
            outer._stop(torch, _P.local.pool)
        bound = native.bind(self._book, self._account)
        torch._C._cuda_beginAllocateCurrentThreadToPool(self._device, pool.id)
        _P.local.memory, _P.local.pool = self, pool
        return (pool, bound, outer)

    def leave(self, torch: Any, token: tuple[Any, Any, Any] | None) -> None:
        if token is None:
            return
        pool, bound, outer = token
        try:
            self._stop(torch, pool)
        finally:
            native.unbind(bound)
            tid = threading.get_ident()
            with self._lock:
                self._active[tid] -= 1
            _P.local.memory, _P.local.pool = None, None
            if outer is not None:  # the routing this one suspended
                outer_pool = outer._pools.get(tid)
                if outer_pool is not None:
                    torch._C._cuda_beginAllocateCurrentThreadToPool(outer._device, outer_pool.id)
                    _P.local.memory, _P.local.pool = outer, outer_pool

    @contextlib.contextmanager
    def capturing(self, torch: Any) -> Iterator[Any]:
        """Route this thread's PyTorch allocations to a pool of their own while a graph is
        captured; the pool (yielded) must live as long as the graph. Blocks the captured
        work frees go back to that pool, which nothing else allocates from afterwards: no
        later work can take memory the graph's replays write (PyTorch's own graph pools
        do the same). Its segments are charged to the context until the pool goes."""
        outer = getattr(_P.local, "memory", None)
        outer_pool: Any = getattr(_P.local, "pool", None)
        if outer is not None:
            outer._stop(torch, outer_pool)
        pool = torch.cuda.MemPool(_P.allocator)
        bound = native.bind(self._book, self._account)
        torch._C._cuda_beginAllocateCurrentThreadToPool(self._device, pool.id)
        try:
            yield pool
        finally:
            try:
                torch._C._cuda_endAllocateToPool(self._device, pool.id)
                torch._C._cuda_releasePool(self._device, pool.id)
            finally:
                native.unbind(bound)
                if outer is not None:
                    torch._C._cuda_beginAllocateCurrentThreadToPool(outer._device, outer_pool.id)

    def _stop(self, torch: Any, pool: Any) -> None:
        torch._C._cuda_endAllocateToPool(self._device, pool.id)
        torch._C._cuda_releasePool(self._device, pool.id)

    def _new_pool(self, torch: Any, tid: int) -> Any:
        pool = torch.cuda.MemPool(_P.allocator)
        with self._lock:
            self._pools[tid] = pool
            self._used = True
        return pool

    def refused(self, why: int, nbytes: int) -> BaseException | None:
        """The error for a refused request of ``nbytes``: over budget (after the ledger's
        policy ran), the context destroyed, or the device itself out of memory."""
        if why == native.REFUSED_CLOSED:
            return ContextClosed(self._name)
        if why == native.REFUSED_DEVICE:
            return CudaError(
                f"the device is out of memory for {nbytes} bytes of context {self._name!r} "
                "although its budget had room; memory outside pygpukit's budgets (other "
                "processes, libraries) took it — lower vram_limit",
                status=_OUT_OF_MEMORY,
            )
        if why != native.REFUSED_BUDGET:
            return None  # not one of ours
        error = self._relieve(nbytes)
        if _P.error_class is not None:
            error.__class__ = _P.error_class
        return error

    def trim(self) -> None:
        """Give back the cached segments of pools no thread is using now: their MemPool is
        dropped (the thread gets a new one at its next step), and PyTorch's ``empty_cache``
        frees the dropped pools' cached segments — also those their live tensors free after
        the drop (an evicted module's). It gives back PyTorch's own cache too, memory outside
        every budget."""
        with self._lock:
            idle = [tid for tid in self._pools if not self._active.get(tid)]
            dropped = [self._pools.pop(tid) for tid in idle]
            used = self._used
        del dropped  # outside the lock: the frees charge the book
        if used and _P.torch is not None:
            _P.torch.cuda.empty_cache()

    def close(self) -> None:
        """The context is gone: drop every pool (it runs no more steps)."""
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        del pools
