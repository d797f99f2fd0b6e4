"""LLM → TTS, streamed sentence by sentence (models with random weights).

    python examples/pipelines/assistant.py "Tell me about GPUs" [--backend host]

Prints each sentence's audio as it arrives, then the per-stage timings: the first audio
comes long before the LLM has finished.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pygpukit.examples import build_assistant
from pygpukit.runtime import QoSPolicy, Runtime


async def main(prompt: str, backend: str, tokens: int) -> None:
    with Runtime(backend=backend) as rt:
        assistant = build_assistant(rt, "assistant", QoSPolicy.GUARANTEED)
        start = time.perf_counter()
        async for audio in assistant.stream({"prompt": prompt, "max_new_tokens": tokens}):
            print(
                f"{(time.perf_counter() - start) * 1e3:7.1f} ms  {len(audio.samples):6d} samples"
                f"  for {audio.text!r}"
            )
        result = await assistant.run({"prompt": prompt, "max_new_tokens": tokens})
        for stage_id, t in result.timings.items():
            print(f"{stage_id:<16} {t.start * 1e3:8.1f} -> {t.end * 1e3:8.1f} ms  items {t.items}")
        print(f"first audio after {result.first_output_s * 1e3:.1f} ms")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("prompt", nargs="?", default="Hello there.")
    p.add_argument("--backend", default="auto")
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args()
    asyncio.run(main(a.prompt, a.backend, a.tokens))
