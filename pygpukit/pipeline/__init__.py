"""Pipelines: typed graphs of async stages, validated when built, run concurrently.

::

    @stage("llm", context="llm")
    async def llm(inp: Prompt) -> AsyncIterator[Sentence]: ...

    @stage("tts", context="tts")
    async def tts(inp: Sentence) -> Audio: ...

    speak = Pipeline.chain("speak", llm, tts, runtime=rt).build()
    result = await speak.run({"prompt": "hi"}, tier="guaranteed", deadline=...)
"""

from ._arrays import Array as Array
from ._arrays import ArraySpec as ArraySpec
from ._graph import Pipeline as Pipeline
from ._result import PipelineResult as PipelineResult
from ._result import PipelineStream as PipelineStream
from ._result import RequestInfo as RequestInfo
from ._result import StageTiming as StageTiming
from ._result import current_request as current_request
from ._spec import PipelineSpec as PipelineSpec
from ._spec import StageSpec as StageSpec
from ._stage import Stage as Stage
from ._stage import StageRegistry as StageRegistry
from ._stage import registry as registry
from ._stage import stage as stage
from ._stats import PipelineStatistics as PipelineStatistics
from ._stats import pipeline_statistics as pipeline_statistics

__all__ = (
    "Array",
    "ArraySpec",
    "Pipeline",
    "PipelineResult",
    "PipelineSpec",
    "PipelineStatistics",
    "PipelineStream",
    "RequestInfo",
    "Stage",
    "StageRegistry",
    "StageSpec",
    "StageTiming",
    "current_request",
    "pipeline_statistics",
    "registry",
    "stage",
)

for _name in __all__:
    _obj = globals()[_name]
    if isinstance(_obj, type) or callable(_obj):
        try:
            _obj.__module__ = __name__
        except (AttributeError, TypeError):  # pragma: no cover - builtins and slots
            pass
del _name, _obj
