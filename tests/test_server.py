"""The FastAPI example through httpx's ASGI transport and through a real uvicorn server."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from pygpukit.runtime import DispatcherConfig

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "examples" / "pipelines" / "server.py"


@pytest.fixture
def anyio_backend() -> str:  # FastAPI/starlette run on asyncio here
    return "asyncio"


def _server_module() -> Any:
    spec = importlib.util.spec_from_file_location("example_server", SERVER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _client(app: Any) -> Any:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_requests_across_tiers_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYGPUKIT_BACKEND", "host")
    app = _server_module().create_app()
    async with app.router.lifespan_context(app), await _client(app) as client:
        replies: dict[str, Any] = {}

        async def ask(service: str, i: int) -> None:
            r = await client.post(
                f"/assistant/{service}", json={"prompt": f"hi {i}", "max_new_tokens": 24}
            )
            assert r.status_code == 200, r.text
            replies[f"{service}{i}"] = r.json()

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for service in ("interactive", "standard", "batch"):
                    for i in range(3):
                        tg.start_soon(ask, service, i)
        assert len(replies) == 9
        for reply in replies.values():
            assert reply["sentences"] and reply["audio_seconds"] > 0
            (llm, tts) = sorted(reply["timings_ms"])  # <service>_llm, <service>_tts
            assert llm.endswith("_llm") and tts.endswith("_tts")
        r = await client.post(
            "/assistant/interactive/stream", json={"prompt": "x", "max_new_tokens": 40}
        )
        lines = [json.loads(line) for line in r.text.splitlines()]
        assert r.headers["content-type"].startswith("application/x-ndjson")
        assert lines and all(line["sample_rate"] == 22050 and line["pcm16_b64"] for line in lines)
        r = await client.post("/describe", json={"prompt": "Describe this image"})
        assert r.status_code == 200 and r.json()["audio_seconds"] > 0
        usage = (await client.get("/usage")).json()
        assert usage["interactive-llm"]["tasks"] >= 3
        r = await client.post("/assistant/nope", json={"prompt": "x"})
        assert r.status_code == 404
        r = await client.post("/assistant/batch", json={"prompt": 3})
        assert r.status_code == 422


async def test_overload_answers_429_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYGPUKIT_BACKEND", "host")
    config = DispatcherConfig(context_in_flight=1, max_queued=1)
    app = _server_module().create_app(dispatcher=config)
    codes: list[int] = []
    bodies: list[Any] = []
    async with app.router.lifespan_context(app), await _client(app) as client:

        async def ask(i: int) -> None:
            r = await client.post(
                "/assistant/batch", json={"prompt": f"p{i}", "max_new_tokens": 16}
            )
            codes.append(r.status_code)
            if r.status_code == 429:
                bodies.append((r.json(), r.headers.get("retry-after")))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for i in range(12):
                    tg.start_soon(ask, i)
    assert codes.count(200) >= 1
    assert codes.count(429) >= 1, codes
    assert set(codes) <= {200, 429}
    body, retry = bodies[0]
    assert body["error"] == "QueueFull" and "tasks waiting to launch" in body["detail"]
    assert retry == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_real_uvicorn_server_on_loopback() -> None:
    port = _free_port()
    env = {**os.environ, "PYGPUKIT_BACKEND": "host"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(SERVER.parent),
            "server:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/usage", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "uvicorn did not come up"
            time.sleep(0.2)
        r = httpx.post(
            f"{base}/assistant/interactive",
            json={"prompt": "hello", "max_new_tokens": 24},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert r.json()["audio_seconds"] > 0
        with httpx.stream(
            "POST",
            f"{base}/assistant/standard/stream",
            json={"prompt": "hello", "max_new_tokens": 40},
            timeout=30,
        ) as s:
            lines = [json.loads(line) for line in s.iter_lines() if line]
        assert lines and all(line["pcm16_b64"] for line in lines)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_shutdown_drains_a_streaming_response(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYGPUKIT_BACKEND", "host")
    from fastapi import FastAPI

    from pygpukit.integrations.fastapi import Pygpukit, ndjson

    gpu = Pygpukit()
    app = FastAPI(lifespan=gpu.lifespan)
    gpu.install(app)
    seen: list[int] = []

    @app.get("/slow")
    async def slow() -> Any:
        async def items() -> Any:
            for i in range(3):
                await anyio.sleep(0.05)
                seen.append(gpu.in_flight)
                yield {"i": i}

        return ndjson(items())

    async with app.router.lifespan_context(app), await _client(app) as client:
        r = await client.get("/slow")
        assert [json.loads(x)["i"] for x in r.text.splitlines()] == [0, 1, 2]
    assert seen == [1, 1, 1]  # counted while the body was still streaming
    assert gpu.in_flight == 0
