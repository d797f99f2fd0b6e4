"""The example pipelines on Hugging Face transformers models: they stream, fan in, load
saved weights, and on CUDA their models' memory is charged to their contexts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from conftest import load_example

from pygpukit.runtime import QoSPolicy, Runtime

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="torch and transformers are not installed",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_the_assistant_streams_audio_per_sentence(backend: str) -> None:
    from pygpukit.examples_hf import build_hf_assistant

    with Runtime(backend=backend, vram_limit=4 << 30) as rt:
        assistant = build_hf_assistant(rt, "assistant", QoSPolicy.GUARANTEED)
        items = [a async for a in assistant.stream({"prompt": "Hello", "max_new_tokens": 30})]
        assert len(items) == 3  # 30 tokens in sentences of 12: 12, 12, 6
        assert all(len(a.samples) > 0 and a.sample_rate == 16000 for a in items)
        assert all(a.text for a in items)
        if rt.backend.name == "cuda":  # the weights were moved in the contexts' sessions
            llm = rt.get_context("assistant-llm")
            assert llm.usage().held > 4 << 20


@pytest.mark.anyio
async def test_describe_fans_in_vision_and_text(backend: str) -> None:
    from pygpukit.examples_hf import build_hf_describe

    with Runtime(backend=backend, vram_limit=4 << 30) as rt:
        describe = build_hf_describe(rt)
        result = await describe.run({"prompt": "a picture", "seed": 1, "max_new_tokens": 8})
        text = result.output.text
        assert text.count(".") >= 1 and len(text.rsplit(". ", 1)[-1].split()) == 3  # caption
        assert len(result.output.samples) > 0


def test_saved_weights_load_back_the_same(tmp_path: Path) -> None:
    import torch

    from pygpukit.examples_hf import HFModels, _make, save_hf_weights

    save_hf_weights(tmp_path)
    for seed, role in enumerate(("lm", "tts", "vit"), start=1):
        fresh = _make(role, HFModels.small(), None, seed)
        loaded = _make(role, HFModels.small(), tmp_path, seed)
        for a, b in zip(fresh.state_dict().values(), loaded.state_dict().values(), strict=True):
            assert torch.equal(a, b)


@pytest.mark.anyio
async def test_the_example_server_serves_the_transformers_models(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import httpx

    monkeypatch.setenv("PYGPUKIT_BACKEND", "host")
    server = load_example("examples/pipelines/server.py", "example_server_hf")
    app = server.create_app(models="hf")
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as client,
    ):
        r = await client.post("/assistant/interactive", json={"prompt": "hi", "max_new_tokens": 24})
        assert r.status_code == 200, r.text
        reply = r.json()
        assert len(reply["sentences"]) == 2 and reply["audio_seconds"] > 0
        assert sorted(reply["timings_ms"]) == ["interactive_hf_llm", "interactive_hf_tts"]
        r = await client.post("/describe", json={"prompt": "Describe this image"})
        assert r.status_code == 200, r.text
