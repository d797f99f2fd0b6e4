"""``PipelineSpec``: a pipeline graph as data (JSON or YAML) that names registered stages.

A spec never imports code: each entry's ``stage`` must already be in
:data:`pygpukit.pipeline.registry` (registered by ``@stage`` in code the application
imported).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .._exceptions import InvalidArgument, PipelineValidationError
from ..runtime import Runtime
from ._graph import Pipeline
from ._stage import StageRegistry, registry

__all__ = ("PipelineSpec", "StageSpec")


class StageSpec(BaseModel):
    """One stage of a spec.

    :ivar id: its id in the graph (sources read ``"<id>.<field>"``)
    :ivar stage: the registered stage name
    :ivar inputs: input field -> source; omitted: the same default as ``Pipeline.add``
    :ivar context: a context name overriding the stage's own
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    stage: str
    inputs: dict[str, str] | None = None
    context: str | None = None


class PipelineSpec(BaseModel):
    """A pipeline as data: ``{"name", "stages": [{"id", "stage", "inputs"}], "output"}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    stages: list[StageSpec] = Field(min_length=1)
    output: str | None = None

    @classmethod
    def from_yaml(cls, text: str) -> PipelineSpec:
        """Parse a YAML document (needs PyYAML).

        :raises InvalidArgument: PyYAML is not installed
        :raises PipelineValidationError: the text is not valid YAML
        :raises pydantic.ValidationError: it does not have the spec's shape
        """
        try:
            import yaml  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            raise InvalidArgument(
                "PipelineSpec.from_yaml() needs PyYAML, which is not installed; install it "
                "with 'pip install pyyaml', or load the spec with "
                "PipelineSpec.model_validate_json()"
            ) from None
        try:
            data: Any = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PipelineValidationError(f"pipeline spec is not valid YAML: {exc}") from None
        return cls.model_validate(data)

    def build(
        self, runtime: Runtime | None = None, *, stages: StageRegistry | None = None
    ) -> Pipeline:
        """The validated :class:`Pipeline` this spec describes.

        :param runtime: where context names are looked up (default: the default runtime)
        :param stages: the registry to resolve stage names in (default: the global one)
        :raises PipelineValidationError: an entry names an unregistered stage (the message
            names the entry), or the graph is invalid (see :meth:`Pipeline.build`)
        """
        reg = registry if stages is None else stages
        pipeline = Pipeline(self.name, runtime)
        for index, entry in enumerate(self.stages):
            if entry.stage not in reg:
                known = ", ".join(repr(n) for n in reg.names()) or "none"
                raise PipelineValidationError(
                    f"pipeline spec {self.name!r} entry {entry.id!r} (stages[{index}]) names "
                    f"stage {entry.stage!r}, which is not registered (registered: {known}); "
                    "specs never import code — import the module that defines it with "
                    f"@stage({entry.stage!r}) first"
                )
            pipeline.add(
                reg.get(entry.stage), id=entry.id, inputs=entry.inputs, context=entry.context
            )
        if self.output is not None:
            pipeline.output(self.output)
        return pipeline.build()
