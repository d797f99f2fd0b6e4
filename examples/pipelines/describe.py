"""The seed's example: LLM and vision in parallel, then TTS on the combined text.

python examples/pipelines/describe.py [--backend host]
"""

from __future__ import annotations

import argparse
import asyncio

from pygpukit.examples import build_describe
from pygpukit.runtime import Runtime


async def main(backend: str) -> None:
    with Runtime(backend=backend) as rt:
        describe = build_describe(rt)
        result = await describe.run({"prompt": "Describe this image and tell me a story"})
        audio = result.output
        print(f"text: {audio.text!r}")
        print(f"audio: {len(audio.samples) / audio.sample_rate:.2f} s")
        for stage_id, t in result.timings.items():
            print(f"{stage_id:<8} {t.start * 1e3:8.1f} -> {t.end * 1e3:8.1f} ms")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backend", default="auto")
    asyncio.run(main(p.parse_args().backend))
