"""The arena a Guaranteed reservation is carved from, held against a byte map of its own.

The expected answers come from the test's model of the region (one flag per byte, and the
free runs read off it), never from the arena's own lists.
"""

from __future__ import annotations

import random

import pytest

from pygpukit import VRAMBudgetExceeded
from pygpukit.runtime._backends._arena import Arena


def _free_runs(used: bytearray) -> list[tuple[int, int]]:
    """``(start, length)`` of every maximal run of free bytes in the model."""
    runs, start = [], None
    for i, flag in enumerate([*used, 1]):
        if not flag and start is None:
            start = i
        elif flag and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def test_a_take_is_the_smallest_free_range_that_fits() -> None:
    arena = Arena(100)
    a, b, c = arena.take(30), arena.take(10), arena.take(20)
    assert (a, b, c) == (0, 30, 40)
    arena.give(0, 30)  # free: [0, 30) and [60, 100)
    assert arena.take(25) == 0  # 30 fits more tightly than 40
    assert arena.take(35) == 60
    assert arena.take(6) is None  # 5 bytes left at 25: nothing fits
    assert arena.used == 25 + 10 + 20 + 35


def test_a_take_never_reaches_past_the_region() -> None:
    arena = Arena(1024)
    assert arena.take(1025) is None
    assert arena.take(1024) == 0
    assert arena.take(1) is None
    arena.give(0, 1024)
    assert arena.largest_free == 1024


def test_given_ranges_coalesce_with_both_neighbours() -> None:
    arena = Arena(300)
    offsets = [arena.take(100) for _ in range(3)]
    assert offsets == [0, 100, 200]
    arena.give(0, 100)
    arena.give(200, 100)
    assert arena.largest_free == 100  # two holes, not adjacent
    arena.give(100, 100)  # the middle joins both
    assert arena.largest_free == 300
    assert arena.take(300) == 0


def test_carving_from_a_fragmented_region_names_the_context_and_the_largest_hole() -> None:
    arena = Arena(4 << 20, "g")
    blocks = [arena.carve(512 << 10) for _ in range(8)]
    for offset in blocks[::2]:
        arena.give(offset, 512 << 10)  # four 512 KiB holes, none adjacent
    with pytest.raises(
        VRAMBudgetExceeded,
        match=r"^context 'g' asked for 1 MiB but only 512 KiB is available in one piece of "
        r"its 4 MiB reservation \(its reserved memory is fragmented\); free neighbouring "
        r"arrays, allocate smaller pieces, or create the context with a larger max_vram$",
    ) as caught:
        arena.carve(1 << 20)
    assert (caught.value.requested, caught.value.available) == (1 << 20, 512 << 10)
    assert arena.used == 2 << 20  # the refusal took nothing


@pytest.mark.parametrize("seed", range(20))
def test_random_takes_and_gives_match_a_byte_map(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([64, 100, 257, 1024])
    arena = Arena(size)
    used = bytearray(size)  # the model: 1 where a live range is
    live: list[tuple[int, int]] = []
    for _ in range(300):
        if live and rng.random() < 0.45:
            offset, n = live.pop(rng.randrange(len(live)))
            arena.give(offset, n)
            used[offset : offset + n] = bytes(n)
        else:
            n = rng.randint(1, size // 3)
            fitting = [run for run in _free_runs(used) if run[1] >= n]
            offset = arena.take(n)
            if not fitting:
                assert offset is None, f"took {n} bytes at {offset} with no free run that long"
                continue
            assert offset is not None, f"refused {n} bytes beside free runs {fitting}"
            run_start, run_len = next(r for r in fitting if r[0] <= offset < r[0] + r[1])
            assert offset + n <= run_start + run_len <= size  # inside one free run
            assert run_len == min(length for _, length in fitting)  # the tightest one
            used[offset : offset + n] = b"\x01" * n
            live.append((offset, n))
        assert arena.used == sum(used)
        assert arena.largest_free == max((length for _, length in _free_runs(used)), default=0)
