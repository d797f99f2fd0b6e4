"""PyTorch inside contexts: its CUDA allocations charged to the context's budget, refused
past it with the translated error, on the context's stream, from sessions and tasks.

torch is imported inside the tests: collecting this file imports nothing of it, so the rest
of the suite runs as a process without torch does.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import CUDA

from pygpukit import (
    MB,
    InvalidArgument,
    QoSPolicy,
    VRAMBudgetExceeded,
    capture_graph,
    context_session,
)
from pygpukit.runtime import Runtime

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not CUDA, reason="no CUDA GPU"),
]


@pytest.fixture
def torch() -> Any:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("this PyTorch has no CUDA")
    return torch


@pytest.fixture
def grt(torch: Any) -> Iterator[Runtime]:
    runtime = Runtime(backend="cuda", vram_limit=4 << 30)
    try:
        yield runtime
    finally:
        runtime.close()


def _held(ctx: Any) -> int:
    return int(ctx.usage().held)


def test_a_tensor_in_a_session_is_charged_to_the_context_on_its_stream(
    torch: Any, grt: Runtime
) -> None:
    assert grt.pytorch_charged() == (True, "")
    ctx = grt.create_context("tts", max_vram=512 * MB)
    other = grt.create_context("other", max_vram=512 * MB)
    assert _held(ctx) == 0
    with context_session(ctx):
        assert torch.cuda.current_stream().cuda_stream == ctx.stream.handle
        x = torch.ones(64 * MB, dtype=torch.uint8, device="cuda")
        assert _held(ctx) >= 64 * MB  # a segment: what the context holds
        y = (x + 1).sum()
    assert int(y) == 2 * 64 * MB
    assert _held(other) == 0
    assert torch.cuda.current_stream().cuda_stream != ctx.stream.handle  # put back
    del x
    gc.collect()
    assert _held(ctx) >= 64 * MB  # cached by PyTorch: still held
    grt.ledger._drop_caches()  # what a refused request does first
    assert _held(ctx) < 64 * MB


def test_past_max_vram_is_refused_as_a_budget_error_that_is_torch_oom(
    torch: Any, grt: Runtime
) -> None:
    ctx = grt.create_context("small", max_vram=256 * MB)
    keep: list[Any] = []

    def fill() -> None:
        with context_session(ctx):
            for _ in range(8):
                keep.append(torch.empty(64 * MB, dtype=torch.uint8, device="cuda"))

    with pytest.raises(VRAMBudgetExceeded, match="context 'small' asked for") as info:
        fill()
    assert isinstance(info.value, torch.OutOfMemoryError)
    assert isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert 3 <= len(keep) <= 4  # 256 MiB in 64 MiB segments, PyTorch's rounding aside
    assert _held(ctx) <= 256 * MB


def test_two_contexts_on_launcher_threads_each_charged_the_tight_one_refused(
    torch: Any, grt: Runtime
) -> None:
    small = grt.create_context("small", max_vram=256 * MB)
    large = grt.create_context("large", max_vram=1024 * MB)

    def fill(n: int) -> int:
        got = []
        try:
            for _ in range(n):
                got.append(torch.empty(64 * MB, dtype=torch.uint8, device="cuda"))
        except torch.OutOfMemoryError:
            pass
        assert torch.cuda.current_stream().cuda_stream in (small.stream.handle, large.stream.handle)
        return len(got)

    async def main() -> tuple[int, int, Any]:
        a = asyncio.ensure_future(small.submit(fill, 16))
        b = asyncio.ensure_future(large.submit(fill, 12))
        return await a, await b, None

    n_small, n_large, _ = asyncio.run(main())
    assert n_small * 64 * MB <= 256 * MB
    assert n_large == 12  # 768 MiB: the tight context's refusals cost it nothing
    assert _held(small) <= 256 * MB
    assert _held(large) >= 12 * 64 * MB


def test_a_task_refused_by_the_budget_fails_with_the_translated_error(
    torch: Any, grt: Runtime
) -> None:
    ctx = grt.create_context("tiny", max_vram=64 * MB)

    def big() -> None:
        torch.empty(256 * MB, dtype=torch.uint8, device="cuda")

    async def main() -> None:
        with pytest.raises(VRAMBudgetExceeded, match="context 'tiny'") as info:
            await ctx.submit(big)
        assert isinstance(info.value, torch.OutOfMemoryError)

    asyncio.run(main())


def test_interleaved_tasks_charge_their_own_contexts_at_every_step(
    torch: Any, grt: Runtime
) -> None:
    a = grt.create_context("a", max_vram=1024 * MB)
    b = grt.create_context("b", max_vram=1024 * MB)

    async def worker(ctx: Any, mb: int, out: list[Any]) -> None:
        async with context_session(ctx):
            for _ in range(5):
                assert torch.cuda.current_stream().cuda_stream == ctx.stream.handle
                out.append(torch.empty(mb * MB, dtype=torch.uint8, device="cuda"))
                await asyncio.sleep(0)  # the other task's step runs in between

    keep: list[Any] = []

    async def main() -> None:
        await asyncio.gather(worker(a, 40, keep), worker(b, 100, keep))

    asyncio.run(main())
    assert 5 * 40 * MB <= _held(a) < 5 * 100 * MB
    assert _held(b) >= 5 * 100 * MB


def test_usage_returns_to_idle_after_a_thousand_requests(torch: Any, grt: Runtime) -> None:
    ctx = grt.create_context("svc", max_vram=512 * MB)
    with context_session(ctx):
        w = torch.randn(256, 256, device="cuda")

    def request(i: int) -> float:
        x = torch.randn(64, 256, device="cuda")
        return float((x @ w).sum()) + i * 0

    async def requests(n: int) -> None:
        for i in range(n):
            await ctx.submit(request, i)
            async with context_session(ctx):
                y = torch.randn(1024, 1024, device="cuda")
                del y

    def idle() -> int:
        gc.collect()
        grt.ledger._drop_caches()
        return _held(ctx)

    asyncio.run(requests(10))  # warm: cuBLAS's workspace stays with the stream it serves
    warm = idle()
    asyncio.run(requests(1000))
    assert idle() == warm
    assert warm < 64 * MB


def test_a_guaranteed_context_carves_torch_tensors_from_its_reservation(
    torch: Any, grt: Runtime
) -> None:
    reserved_before = grt.ledger.reserved_total()
    ctx = grt.create_context("g", max_vram=512 * MB, qos=QoSPolicy.GUARANTEED)
    assert grt.ledger.reserved_total() == reserved_before + 512 * MB
    base = ctx._pool._base_ptr
    with context_session(ctx):
        x = torch.zeros(100 * MB, dtype=torch.uint8, device="cuda")
        y = grt.xp.zeros(50 * MB, dtype="uint8")  # CuPy, from the same arena
    assert base <= x.data_ptr() < base + 512 * MB
    assert base <= int(y.data.ptr) < base + 512 * MB
    assert grt.ledger.reserved_total() == reserved_before + 512 * MB  # not a second one
    assert _held(ctx) >= 150 * MB
    del x, y


def test_destroying_a_context_gives_its_torch_memory_back(torch: Any, grt: Runtime) -> None:
    free_before = grt.available_vram()
    ctx = grt.create_context("tmp", max_vram=512 * MB)
    with context_session(ctx):
        x = torch.empty(128 * MB, dtype=torch.uint8, device="cuda")
    del x
    gc.collect()
    grt.destroy_context(ctx)
    gc.collect()
    torch.cuda.synchronize()
    assert grt.available_vram() == free_before


def test_a_thread_session_binds_and_other_threads_are_not_charged(torch: Any, grt: Runtime) -> None:
    ctx = grt.create_context("t", max_vram=512 * MB)
    seen: list[int] = []

    def outside() -> None:
        x = torch.empty(32 * MB, dtype=torch.uint8, device="cuda")
        seen.append(x.numel())

    with context_session(ctx):
        t = threading.Thread(target=outside)
        t.start()
        t.join()
        assert _held(ctx) == 0  # the other thread is not in the session
        x = torch.empty(32 * MB, dtype=torch.uint8, device="cuda")
        assert _held(ctx) >= 32 * MB
    assert seen == [32 * MB]
    del x


def test_a_module_is_evicted_for_a_guaranteed_context_and_restored_bit_exact(
    torch: Any, grt: Runtime
) -> None:
    free = grt.ledger.reservable()
    be = grt.create_context("batch", max_vram=free, qos=QoSPolicy.BEST_EFFORT)
    with context_session(be):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(4096, 4096), torch.nn.LayerNorm(4096), torch.nn.Linear(4096, 512)
        ).to("cuda")
        x = torch.randn(4, 4096, device="cuda")
        before = model(x).detach().clone()
        weight = model[0].weight  # the Parameter object: it must stay the same one
    handle = be.evictable(model)
    nbytes = handle.nbytes
    assert nbytes >= 4096 * 4096 * 4
    # a Guaranteed context that needs what BestEffort holds: the module spills
    g = grt.create_context(
        "interactive", max_vram=grt.ledger.reservable() + nbytes // 2, qos=QoSPolicy.GUARANTEED
    )
    assert not handle.on_device
    assert _held(be) < nbytes  # its segments went back
    grt.destroy_context(g)
    with context_session(be):  # the next session brings it back
        assert handle.on_device
        after = model(x)
    assert model[0].weight is weight
    assert torch.equal(after, before)
    assert handle.evictions == 1
    assert handle.restores == 1


def test_evictable_refuses_a_module_on_the_cpu(torch: Any, grt: Runtime) -> None:
    be = grt.create_context("batch", max_vram=256 * MB, qos=QoSPolicy.BEST_EFFORT)
    with pytest.raises(InvalidArgument, match=r"on this context's CUDA device \(cuda:0\)"):
        be.evictable(torch.nn.Linear(4, 4))


def test_a_captured_torch_step_replays_with_the_same_output(torch: Any, grt: Runtime) -> None:
    ctx = grt.create_context("decode", max_vram=512 * MB)
    out: dict[str, Any] = {}
    with context_session(ctx):
        w = torch.randn(512, 512, device="cuda")
        x = torch.randn(8, 512, device="cuda")

        def step() -> None:
            out["y"] = torch.relu(x @ w) + 1  # a temporary and an output, in the graph's pool

        step()  # eager first: cuBLAS makes its handle and workspace outside the capture
        eager = out["y"].clone()
        graph = capture_graph(step)
        out["y"].zero_()
        graph.launch()
        torch.cuda.current_stream().synchronize()
        assert torch.equal(out["y"], eager)
        x.copy_(torch.randn(8, 512, device="cuda"))  # new input, same buffers
        graph.launch()
        torch.cuda.current_stream().synchronize()
        assert torch.equal(out["y"], torch.relu(x @ w) + 1)
    held = _held(ctx)
    graph.close()
    out.clear()
    gc.collect()
    grt.ledger._drop_caches()
    assert _held(ctx) < held  # the graph's pool went with it
