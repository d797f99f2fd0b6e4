"""Ray Serve: GPU shares enforced as budgets per replica, typed errors through handles,
multiplexing by memory, tiers and deadlines across deployments — on a local Ray cluster
with one logical GPU and pygpukit's host backend."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from conftest import load_example
from pydantic import BaseModel

from pygpukit import PipelineValidationError, QoSPolicy, VRAMBudgetExceeded
from pygpukit.pipeline import Pipeline, current_request, stage
from pygpukit.runtime import Runtime, context_session

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
from pygpukit.integrations.ray import (  # noqa: E402
    ModelPool,
    Replica,
    RequestMeta,
    remote_stage,
    request_meta,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MiB = 1 << 20
HOST_VRAM = 256 * MiB  # each replica's "device"; half of it is a 0.5-GPU replica's share


# -- without a cluster ------------------------------------------------------------------
def test_a_deadline_travels_as_the_seconds_left() -> None:
    deadline = time.monotonic() + 5
    meta = request_meta(tier="guaranteed", priority=-1, deadline=deadline)
    assert (meta.tier, meta.priority) == ("GUARANTEED", -1)
    assert meta.seconds_left is not None and 4.5 < meta.seconds_left <= 5
    again = RequestMeta.model_validate_json(meta.model_dump_json())  # as it crosses over
    local = again.deadline()
    assert local is not None and abs(local - deadline) < 0.5
    assert RequestMeta().deadline() is None and RequestMeta.current() == RequestMeta()


class Word(BaseModel):
    text: str


class Count(BaseModel):
    n: int


def test_a_remote_stage_is_typed_and_gets_the_requests_meta() -> None:
    seen: list[RequestMeta] = []

    async def call(inp: BaseModel, meta: RequestMeta) -> dict[str, int]:
        seen.append(meta)
        assert isinstance(inp, Word)
        return {"n": len(inp.text)}  # validated into Count on the way back

    @stage("ray_test_upper")
    async def upper(inp: Word) -> Word:
        info = current_request()
        assert info is not None
        return Word(text=inp.text.upper())

    count = remote_stage("ray_test_count", call, Word, Count)

    async def main() -> Any:
        with Runtime(backend="host") as rt:
            pipe = Pipeline.chain("ray-typed", upper, count, runtime=rt).build()
            deadline = time.monotonic() + 30
            return await pipe.run({"text": "abcd"}, tier="burstable", deadline=deadline)

    result = asyncio.run(main())
    assert result.output == Count(n=4)
    (meta,) = seen
    assert meta.tier == "BURSTABLE" and meta.seconds_left is not None and meta.seconds_left > 20
    # typed: a remote stage whose input does not fit what feeds it fails the build
    wrong = remote_stage("ray_test_wrong", call, Count, Count)
    with pytest.raises(PipelineValidationError):
        Pipeline.chain("ray-wrong", upper, wrong).build()


def test_a_model_pool_refuses_guaranteed_models() -> None:
    from pygpukit import InvalidArgument

    with Runtime(backend="host") as rt, pytest.raises(InvalidArgument, match="never paged out"):
        ModelPool(rt, lambda model_id: None, max_vram=MiB, qos=QoSPolicy.GUARANTEED)


MODEL_BYTES = 40 * MiB  # three fit in a 128 MiB share; a fourth pages one out


def _weights(xp: Any, model_id: str) -> Any:
    seed = int.from_bytes(hashlib.sha256(model_id.encode()).digest()[:4], "little")
    values = np.random.default_rng(seed).random(MODEL_BYTES // 4, dtype=np.float32)
    out = xp.empty(values.shape, dtype=np.float32)
    out[...] = values
    return out


def test_a_model_pool_pages_the_least_recently_used_out_and_back() -> None:
    async def main() -> None:
        with Runtime(backend="host", vram_limit=128 * MiB) as rt:
            pool = ModelPool(rt, lambda m: _weights(rt.xp, m), max_vram=MODEL_BYTES + MiB)

            async def digest(model_id: str) -> str:
                loaded = await pool.get(model_id)
                async with loaded.session() as weights:
                    return hashlib.sha256(np.asarray(weights).tobytes()).hexdigest()

            first = {m: await digest(m) for m in "abc"}
            await digest("d")
            assert pool.resident() == {"a": False, "b": True, "c": True, "d": True}
            assert await digest("a") == first["a"]
            assert pool.resident() == {"b": False, "c": True, "d": True, "a": True}
            # a model in use is not paged out for another: c stays while its block runs
            c = await pool.get("c")
            async with c.session():
                assert await digest("b") == first["b"]
                assert pool.resident()["c"]
            await pool.unload("b")
            assert "b" not in pool and "model-b" not in {x.name for x in rt.contexts}
            loaded = await pool.get("d")
            await pool.unload("d")
            with pytest.raises(InvalidArgument, match="was unloaded"):
                async with loaded.session():
                    pass

    from pygpukit import InvalidArgument

    asyncio.run(main())


class _Local(Replica):
    def setup(self, rt: Runtime) -> None:
        rt.create_context("g", MiB, qos=QoSPolicy.GUARANTEED)


def test_autoscaling_stats_count_waits_per_window_and_survive_a_destroyed_context() -> None:
    async def main() -> None:
        replica = _Local()  # outside Ray: the whole (host) device
        try:
            ctx = replica.runtime.get_context("g")
            for _ in range(5):
                await ctx.submit(time.sleep, 0.001)
            stats = replica.record_autoscaling_stats()
            assert stats["GUARANTEED_queued"] == 0 and stats["GUARANTEED_wait_p99_s"] >= 0
            ctx.close()  # its counts go with it; a new one starts from nothing
            again = replica.runtime.create_context("g", MiB, qos=QoSPolicy.GUARANTEED)
            from pygpukit.runtime import Dispatcher, DispatcherConfig

            assert isinstance(replica.runtime.policy, Dispatcher)
            replica.runtime.policy.config = DispatcherConfig(context_in_flight=1)
            await asyncio.gather(*(again.submit(time.sleep, 0.02) for _ in range(4)))
            stats = replica.record_autoscaling_stats()
            assert stats["GUARANTEED_wait_p99_s"] >= 0.02  # the last of four waited 3 x 20 ms
            assert replica.record_autoscaling_stats()["GUARANTEED_wait_p99_s"] == 0.0
        finally:
            del replica

    asyncio.run(main())


# -- on a local cluster ------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    env = {"env_vars": {"PYGPUKIT_BACKEND": "host", "PYGPUKIT_HOST_VRAM": str(HOST_VRAM)}}
    ray.init(
        num_cpus=2,
        num_gpus=1,  # a logical GPU: what Ray shares out, and pygpukit budgets
        include_dashboard=False,
        log_to_driver=False,
        runtime_env=env,
    )
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


class Hog(Replica):
    """Holds what it is asked to allocate, in one BestEffort context as large as its share."""

    def setup(self, rt: Runtime) -> None:
        self.ctx = rt.create_context("hog", rt.ledger.capacity, qos=QoSPolicy.BEST_EFFORT)
        self.kept: list[Any] = []

    async def hold(self, nbytes: int) -> int:
        async with context_session(self.ctx):
            self.kept.append(self.runtime.xp.empty(nbytes, dtype=np.uint8))
        return int(self.ctx.usage().held)


def _deploy(cls: Any, name: str, **options: Any) -> Any:
    deployment = serve.deployment(
        cls, ray_actor_options={"num_gpus": 0.5, "num_cpus": 0}, **options
    )
    return serve.run(deployment.bind(), name=name, route_prefix=None)


def test_a_replica_over_its_share_is_refused_while_its_neighbour_goes_on(cluster: None) -> None:
    a, b = _deploy(Hog, "hog-a"), _deploy(Hog, "hog-b")  # both on the one GPU, half each
    share = HOST_VRAM // 2
    assert a.vram_limit.remote().result() == share
    assert b.vram_limit.remote().result() == share
    assert a.hold.remote(share * 3 // 4).result() == share * 3 // 4
    with pytest.raises(VRAMBudgetExceeded) as refused:  # the same type, through the handle
        a.hold.remote(share // 2).result()
    assert "'hog'" in str(refused.value)
    # the neighbour's share is its own: it takes as much as a had, and more
    assert b.hold.remote(share * 3 // 4).result() == share * 3 // 4
    assert b.hold.remote(share // 8).result() == share * 7 // 8
    usage = a.usage.remote().result()
    assert usage["hog"]["refusals"] == 1 and usage["hog"]["held"] == share * 3 // 4
    serve.delete("hog-a")
    serve.delete("hog-b")


class Zoo(Replica):
    """Models multiplexed by memory: loaded on demand, paged out, brought back."""

    def setup(self, rt: Runtime) -> None:
        self.pool = ModelPool(
            rt, lambda model_id: _weights(rt.xp, model_id), max_vram=MODEL_BYTES + MiB
        )

    @serve.multiplexed(max_num_models_per_replica=16)  # memory decides, not this count
    async def model(self, model_id: str) -> Any:
        return await self.pool.get(model_id)

    async def digest(self) -> str:
        loaded = await self.model(serve.get_multiplexed_model_id())  # maybe Serve's cache
        async with loaded.session() as weights:  # paged in here
            return hashlib.sha256(np.asarray(weights).tobytes()).hexdigest()

    def resident(self) -> dict[str, bool]:
        return self.pool.resident()


def test_a_multiplexed_model_is_paged_out_and_restored_bit_exact(cluster: None) -> None:
    zoo = _deploy(Zoo, "zoo")

    def digest(model_id: str) -> str:
        return str(zoo.options(multiplexed_model_id=model_id).digest.remote().result())

    first = {m: digest(m) for m in ("a", "b", "c")}
    assert zoo.resident.remote().result() == {"a": True, "b": True, "c": True}
    digest("d")  # no room for a fourth: the least recently used, a, goes to host memory
    assert zoo.resident.remote().result() == {"a": False, "b": True, "c": True, "d": True}
    assert digest("a") == first["a"]  # back, bit for bit (b made room for it)
    assert zoo.resident.remote().result() == {"b": False, "c": True, "d": True, "a": True}
    usage = zoo.usage.remote().result()
    assert usage["model-a"]["evictions"] == 1 and usage["model-a"]["restores"] == 1
    assert digest("b") == first["b"]
    serve.delete("zoo")


def test_the_example_serves_two_tiers_across_two_deployments(cluster: None) -> None:
    example = load_example("examples/ray/assistant.py", "ray_assistant_example")
    ray.cloudpickle.register_pickle_by_value(example)
    options = {"ray_actor_options": {"num_gpus": 0.5, "num_cpus": 0}}
    speaker = serve.deployment(example.Speaker, **options)
    assistant = serve.deployment(example.Assistant, max_ongoing_requests=32, **options)
    handle = serve.run(assistant.bind(speaker.bind()), name="assistant", route_prefix=None)

    async def ask_both() -> dict[str, Any]:
        prompt = example.Prompt(prompt="Hello there.", max_new_tokens=8)
        replies = await asyncio.gather(
            *(
                handle.ask.remote(prompt, request_meta(tier=tier, deadline=time.monotonic() + 60))
                for tier in ("guaranteed", "best_effort")
                for _ in range(2)
            )
        )
        return {"replies": replies}

    replies = asyncio.run(ask_both())["replies"]
    assert len(replies) == 4
    assert all(r and all(s.audio_seconds > 0 for s in r) for r in replies)
    # each request's tier reached the other deployment: each tier's TTS context did work
    speaker_handle = serve.get_deployment_handle("Speaker", app_name="assistant")
    usage = speaker_handle.usage.remote().result()
    assert usage["interactive-tts"]["tasks"] >= 2 and usage["batch-tts"]["tasks"] >= 2
    assert handle.vram_limit.remote().result() == HOST_VRAM // 2
    stats = handle.record_autoscaling_stats.remote().result()
    assert {"GUARANTEED_queued", "BEST_EFFORT_in_flight", "GUARANTEED_wait_p99_s"} <= set(stats)
    # a deadline already past is refused in the replica, with the type it has there
    from pygpukit import DeadlineExceeded

    late = request_meta(tier="guaranteed", deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        handle.ask.remote(example.Prompt(prompt="late"), late).result()
    serve.delete("assistant")


class Tiers(Replica):
    """A Guaranteed and a BestEffort context; each request holds a task for 50 ms."""

    def setup(self, rt: Runtime) -> None:
        self.ctxs = {
            tier.name: rt.create_context(tier.name.lower(), 8 * MiB, qos=tier)
            for tier in (QoSPolicy.GUARANTEED, QoSPolicy.BEST_EFFORT)
        }

    async def work(self, meta: RequestMeta) -> float:
        ctx = self.ctxs[meta.tier or "BEST_EFFORT"]
        await ctx.submit(time.sleep, 0.05, priority=meta.priority, deadline=meta.deadline())
        return time.time()


def test_a_guaranteed_request_is_not_queued_behind_best_effort_work(cluster: None) -> None:
    # Serve's own queue in front of a replica is first come, first served: let requests
    # into the replica (max_ongoing_requests), whose pygpukit queue orders them by tier
    handle = _deploy(Tiers, "tiers", max_ongoing_requests=64)
    handle.work.remote(RequestMeta()).result()  # warm

    async def flood() -> tuple[float, list[float]]:
        batch = [
            handle.work.remote(request_meta(tier="best_effort", deadline=time.monotonic() + 60))
            for _ in range(12)
        ]
        await asyncio.sleep(0.1)  # the flood is in the replica's queue first
        urgent = handle.work.remote(request_meta(tier="guaranteed"))
        done = await urgent
        return done, list(await asyncio.gather(*batch))

    urgent_done, batch_done = asyncio.run(flood())
    # 12 BestEffort tasks of 50 ms, two at a time at most: ~0.3 s; the Guaranteed one runs
    # beside them, not after them
    assert sum(t < urgent_done for t in batch_done) <= 4, sorted(
        t - urgent_done for t in batch_done
    )
    stats = handle.record_autoscaling_stats.remote().result()
    assert stats["BEST_EFFORT_wait_p99_s"] > stats["GUARANTEED_wait_p99_s"]
    handle.report_metrics.remote().result()  # the ray.serve.metrics gauges can be set
    serve.delete("tiers")
