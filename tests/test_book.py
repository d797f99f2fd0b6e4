"""The memory book: the native one (C, what PyTorch's allocator charges) and the Python one
give the same answers, and both keep the ledger's arithmetic."""

from __future__ import annotations

import random

import pytest

from pygpukit.runtime._book import PyBook, native

BOOKS = [pytest.param(PyBook, id="python")]
if native is not None:
    BOOKS.append(pytest.param(native.Book, id="native"))

MiB = 1 << 20


@pytest.mark.parametrize("make", BOOKS)
def test_reservations_and_shared_memory(make: type) -> None:
    book = make(100 * MiB)
    g = book.open(30 * MiB, 0, 30 * MiB)  # Guaranteed: all of it reserved
    b = book.open(60 * MiB, 10 * MiB, 10 * MiB)  # Burstable: its base reserved
    e = book.open(100 * MiB, 0, 0)  # BestEffort: nothing reserved
    assert book.totals() == (100 * MiB, 40 * MiB, 60 * MiB)
    assert book.available(g) == 30 * MiB  # its reservation; the shared part is past its budget
    assert book.available(b) == 60 * MiB  # base 10 + shared 60, up to max_vram 60
    assert book.charge(e, 50 * MiB) == 1
    assert book.available(b) == 20 * MiB  # base 10 + the shared 10 BestEffort left
    assert book.charge(b, 21 * MiB) == 0  # refused, nothing charged
    assert book.state(b)[0] == 0
    assert book.charge(g, 30 * MiB) == 1  # Guaranteed's own reservation, whatever the rest does
    assert book.charge(g, 1) == 0  # past max_vram
    assert book.state(g)[:3] == (30 * MiB, 30 * MiB, 30 * MiB)


@pytest.mark.parametrize("make", BOOKS)
def test_a_closed_account_refuses_and_is_dropped_once_empty(make: type) -> None:
    book = make(100 * MiB)
    a = book.open(50 * MiB, 0, 20 * MiB)
    assert book.charge(a, 30 * MiB) == 1
    book.close(a)
    assert book.charge(a, 1) == -1
    assert book.totals() == (100 * MiB, 0, 70 * MiB)  # the reservation went; the bytes stay held
    assert not book.drop(a)  # still holds bytes
    book.release(a, 30 * MiB)
    assert book.drop(a)
    assert book.totals() == (100 * MiB, 0, 100 * MiB)
    with pytest.raises(ValueError, match="no open account"):
        book.available(a)
    assert book.open(1, 0, 0) == a  # its line is reused


def test_native_and_python_books_agree_on_random_operations() -> None:
    if native is None:
        pytest.skip("the native extension is not built")
    rng = random.Random(7)
    books = [PyBook(64 * MiB), native.Book(64 * MiB)]
    open_ids: list[int] = []
    held: dict[int, int] = {}
    for _ in range(3000):
        op = rng.random()
        if op < 0.1 or not open_ids:
            max_vram = rng.randrange(1, 40) * MiB
            reserved = rng.choice([0, max_vram, max_vram // 2])
            if reserved > books[0].totals()[2]:
                reserved = 0
            ids = {bk.open(max_vram, reserved, reserved) for bk in books}
            assert len(ids) == 1
            (i,) = ids
            open_ids.append(i)
            held[i] = 0
        elif op < 0.6:
            i = rng.choice(open_ids)
            n = rng.randrange(0, 20 * MiB)
            results = {bk.charge(i, n) for bk in books}
            assert len(results) == 1, (i, n)
            if results == {1}:
                held[i] += n
        elif op < 0.9:
            i = rng.choice(open_ids)
            n = rng.randrange(0, held[i] + 1)
            for bk in books:
                bk.release(i, n)
            held[i] -= n
        else:
            i = rng.choice(open_ids)
            for bk in books:
                bk.close(i)
            if held[i] == 0:
                assert {bk.drop(i) for bk in books} == {True}
                open_ids.remove(i)
        assert books[0].totals() == books[1].totals()
        for i in open_ids:
            assert books[0].state(i) == books[1].state(i)
            assert books[0].available(i) == books[1].available(i)


@pytest.mark.parametrize(
    "make",
    [pytest.param(None, id="python")]
    + ([pytest.param(native.Arena, id="native")] if native is not None else []),
)
def test_arena_best_fit_and_coalescing(make: type | None) -> None:
    from pygpukit.runtime._backends._arena import Arena

    arena = Arena(100) if make is None else make(100)
    assert arena.take(10) == 0
    assert arena.take(20) == 10
    assert arena.take(30) == 30
    assert arena.used == 60
    arena.give(10, 20)
    assert arena.take(15) == 10  # the smallest range that fits: the 20 freed, not the 40 left
    arena.give(0, 10)
    arena.give(10, 15)  # coalesces with the range before and the 5 after it
    assert arena.largest_free == 40
    assert arena.take(30) == 0
    assert arena.take(41) is None
    with pytest.raises(ValueError, match="at least one byte"):
        arena.take(0)


def test_native_and_python_arenas_agree_on_random_operations() -> None:
    if native is None:
        pytest.skip("the native extension is not built")
    from pygpukit.runtime._backends._arena import Arena

    rng = random.Random(11)
    arenas = [Arena(1 << 20), native.Arena(1 << 20)]
    taken: list[tuple[int, int]] = []
    for _ in range(4000):
        if taken and rng.random() < 0.45:
            offset, n = taken.pop(rng.randrange(len(taken)))
            for a in arenas:
                a.give(offset, n)
        else:
            n = rng.choice([512, 4096, rng.randrange(1, 64) * 512, rng.randrange(1, 300_000)])
            offsets = {a.take(n) for a in arenas}
            assert len(offsets) == 1, n  # the same best fit
            (offset,) = offsets
            if offset is not None:
                taken.append((offset, n))
        assert arenas[0].used == arenas[1].used
        assert arenas[0].largest_free == arenas[1].largest_free


def _has_gpu() -> bool:
    from conftest import CUDA

    return CUDA


@pytest.mark.skipif(native is None, reason="the native extension is not built")
@pytest.mark.skipif(_has_gpu(), reason="checks the refusals a machine without a driver gives")
def test_pytorchs_allocator_entry_points_refuse_with_the_reason_and_charge_nothing() -> None:
    """PyTorch calls these two C functions; without a GPU every allocation is refused, each
    for its reason, which the thread can read once."""
    import ctypes

    lib = ctypes.CDLL(native.__file__)
    alloc, free = lib.pygpukit_torch_alloc, lib.pygpukit_torch_free
    alloc.restype, alloc.argtypes = (
        ctypes.c_void_p,
        [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p],
    )
    free.restype = None
    free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    book = native.Book(100 * MiB)
    a = book.open(10 * MiB, 0, 0)
    assert alloc(MiB, 0, None) is None
    assert native.last_refusal()[0] == 4  # unbound: this thread charges no account
    assert native.last_refusal() is None  # read once
    token = native.bind(book, a)
    try:
        assert alloc(11 * MiB, 0, None) is None
        assert native.last_refusal() == (1, 11 * MiB, a)  # over its budget
        assert alloc(MiB, 0, None) is None
        assert native.last_refusal() == (3, MiB, a)  # the device (no driver) refused it
        held, peak = book.state(a)[:2]
        assert held == 0  # charged, then given back when the device refused
        assert peak == MiB  # the charge came first
        book.close(a)
        assert alloc(MiB, 0, None) is None
        assert native.last_refusal() == (2, MiB, a)  # its context is closed
        free(None, 0, 0, None)  # PyTorch may free a null block: nothing happens
    finally:
        native.unbind(token)
