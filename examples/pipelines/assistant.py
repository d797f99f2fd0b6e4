"""LLM → TTS, streamed sentence by sentence (models with random weights).

    python examples/pipelines/assistant.py "Tell me about GPUs" [--backend host]
    python examples/pipelines/assistant.py --save-weights weights/   # write them once
    python examples/pipelines/assistant.py "Hi" --weights weights/   # load them

Prints each sentence's audio as it arrives, then the per-stage timings: the first audio
comes long before the LLM has finished.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from pygpukit.examples import build_assistant, save_assistant_weights
from pygpukit.runtime import QoSPolicy, Runtime


async def main(prompt: str, backend: str, tokens: int, weights: str | None) -> None:
    with Runtime(backend=backend) as rt:
        assistant = build_assistant(rt, "assistant", QoSPolicy.GUARANTEED, weights=weights)
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
    p.add_argument("--weights", help="directory with lm.npz and tts.npz (default: random)")
    p.add_argument("--save-weights", metavar="DIR", help="write random weights there and exit")
    a = p.parse_args()
    if a.save_weights:
        save_assistant_weights(a.save_weights)
        print(f"wrote {a.save_weights}/lm.npz and {a.save_weights}/tts.npz")
    else:
        asyncio.run(main(a.prompt, a.backend, a.tokens, a.weights))
