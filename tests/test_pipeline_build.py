"""Pipeline graphs: good ones build, bad ones are rejected naming the stage and field."""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator

import numpy as np
import pydantic
import pytest
from pydantic import BaseModel

from pygpukit import InvalidArgument, PipelineValidationError
from pygpukit.pipeline import Array, Pipeline, PipelineSpec, registry, stage
from pygpukit.runtime import Runtime

# -- models and stages (registered under a "tb_" prefix, unique to this module) --------


class Prompt(BaseModel):
    prompt: str
    max_tokens: int = 32


class Text(BaseModel):
    text: str


class Tokens(BaseModel):
    text: int  # same field name as Text.text, different type


class Mel(BaseModel):
    mel: Array[np.float32, (None, 80)]


class Mel16(BaseModel):
    mel: Array[np.float16, (None, 80)]


class Mel64(BaseModel):
    mel: Array[np.float32, (None, 64)]


class Wave(BaseModel):
    audio: Array[np.float32, (None,)]


class Caption(BaseModel):
    caption: str


class Image(BaseModel):
    pixels: Array[np.uint8, (None, None, 3)]


class Mix(BaseModel):
    text: str
    caption: str


class Voice(BaseModel):
    text: str
    voice: str


class Maybe(BaseModel):
    text: str | None


@stage("tb_llm")
async def llm(inp: Prompt) -> Text:
    return Text(text=inp.prompt)


@stage("tb_llm_stream")
async def llm_stream(inp: Prompt) -> AsyncIterator[Text]:
    yield Text(text=inp.prompt)


@stage("tb_tokens")
async def tokens(inp: Prompt) -> Tokens:
    return Tokens(text=len(inp.prompt))


@stage("tb_tts")
async def tts(inp: Text) -> Mel:
    return Mel(mel=np.zeros((1, 80), np.float32))


@stage("tb_voice")
async def voice(inp: Voice) -> Text:
    return Text(text=inp.text)


@stage("tb_maybe")
async def maybe(inp: Maybe) -> Text:
    return Text(text=inp.text or "")


@stage("tb_vocoder")
async def vocoder(inp: Mel) -> Wave:
    return Wave(audio=np.zeros(4, np.float32))


@stage("tb_tts16")
async def tts16(inp: Text) -> Mel16:
    return Mel16(mel=np.zeros((1, 80), np.float16))


@stage("tb_tts64")
async def tts64(inp: Text) -> Mel64:
    return Mel64(mel=np.zeros((1, 64), np.float32))


@stage("tb_vision")
async def vision(inp: Image) -> Caption:
    return Caption(caption="a cat")


@stage("tb_mix")
async def mix(inp: Mix) -> Text:
    return Text(text=f"{inp.caption}: {inp.text}")


@stage("tb_echo")
async def echo(inp: Text) -> Text:
    return inp


# -- good graphs ------------------------------------------------------------------------


def test_chain_builds_and_derives_the_request_model() -> None:
    p = Pipeline.chain("speak", llm, tts, vocoder).build()
    assert p.build() is p  # idempotent
    assert p.stage_ids == ("tb_llm", "tb_tts", "tb_vocoder")
    assert set(p.request_model.model_fields) == {"prompt", "max_tokens"}
    assert p.request_model.model_fields["prompt"].is_required()
    assert p.request_model.model_fields["max_tokens"].default == 32
    assert p.request_model.__name__ == "SpeakRequest"
    assert p.output_model is Wave
    node = p.plan.nodes["tb_tts"]
    assert [(b.field, b.source, b.source_field) for b in node.bindings] == [
        ("text", "tb_llm", "text")
    ]


def test_fan_out_and_fan_in_with_explicit_mapping() -> None:
    p = (
        Pipeline("describe")
        .add(vision, id="see", inputs={"pixels": "$input.image"})
        .add(llm, id="think", inputs={"prompt": "$input.prompt"})
        .add(mix, id="join", inputs={"text": "think.text", "caption": "see.caption"})
        .add(tts, id="say", inputs={"text": "join.text"})
        .add(echo, id="log", inputs={"text": "join.text"})  # fan-out from join.text
        .output("say")
        .build()
    )
    assert set(p.request_model.model_fields) == {"image", "prompt"}
    assert p.plan.output == "say"
    assert p.plan.nodes["join"].readers == ("say", "log")
    with pytest.raises(pydantic.ValidationError):  # the request's array field is checked
        p.request_model(image=np.zeros((2, 2, 4), np.uint8), prompt="x")
    p.request_model(image=np.zeros((2, 2, 3), np.uint8), prompt="x")


def test_compatible_types_build() -> None:
    # str -> str | None (a union containing it); an unmapped field with a default is fine
    Pipeline("p").add(llm).add(maybe, inputs={"text": "tb_llm.text"}).build()


def test_streamed_edge_feeds_the_per_item_fields() -> None:
    p = Pipeline.chain("s", llm_stream, tts, vocoder).build()
    nodes = p.plan.nodes
    assert nodes["tb_llm_stream"].per_item and nodes["tb_tts"].per_item
    assert nodes["tb_tts"].stream_source == "tb_llm_stream"
    assert nodes["tb_vocoder"].stream_source == "tb_tts"


SPEC = {
    "name": "speak",
    "stages": [
        {"id": "think", "stage": "tb_llm"},
        {"id": "say", "stage": "tb_tts", "inputs": {"text": "think.text"}},
    ],
    "output": "say",
}

SPEC_YAML = """
name: speak
stages:
  - id: think
    stage: tb_llm
  - id: say
    stage: tb_tts
    inputs: {text: think.text}
output: say
"""


def test_spec_from_json_builds() -> None:
    import json

    spec = PipelineSpec.model_validate_json(json.dumps(SPEC))
    p = spec.build()
    assert p.stage_ids == ("think", "say")
    assert p.output_model is Mel


def test_spec_from_yaml_builds() -> None:
    pytest.importorskip("yaml")
    spec = PipelineSpec.from_yaml(SPEC_YAML)
    assert spec == PipelineSpec.model_validate(SPEC)
    assert spec.build().stage_ids == ("think", "say")


def test_spec_from_yaml_without_pyyaml_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes "import yaml" fail
    with pytest.raises(
        InvalidArgument,
        match=r"^PipelineSpec\.from_yaml\(\) needs PyYAML, which is not installed; install "
        r"it with 'pip install pyyaml', or load the spec with "
        r"PipelineSpec\.model_validate_json\(\)$",
    ):
        PipelineSpec.from_yaml(SPEC_YAML)


def test_spec_context_names_resolve_against_the_runtime(host_rt: Runtime) -> None:
    ctx = host_rt.create_context("speech", max_vram=1 << 20)
    spec = PipelineSpec.model_validate(
        {"name": "s", "stages": [{"id": "a", "stage": "tb_llm", "context": "speech"}]}
    )
    assert spec.build(host_rt).plan.nodes["a"].ctx is ctx


# -- bad graphs -------------------------------------------------------------------------


def test_cycle_is_rejected_naming_the_stages() -> None:
    p = (
        Pipeline("loop")
        .add(llm, id="a", inputs={"prompt": "c.text"})
        .add(echo, id="b", inputs={"text": "a.text"})
        .add(echo, id="c", inputs={"text": "b.text"})
    )
    with pytest.raises(
        PipelineValidationError,
        match=r"^pipeline 'loop' has a cycle: a -> c -> b -> a \(each stage reads the next "
        r"one's output\); a stage cannot depend on its own output$",
    ):
        p.build()


def test_unmapped_input_is_rejected() -> None:
    p = Pipeline("p").add(llm).add(voice)  # voice.voice has no source and no default
    with pytest.raises(
        PipelineValidationError,
        match=r"^stage 'tb_voice' input field 'voice' has no source and no default; map it "
        r"with inputs=\{'voice': '\$input\.voice'\} or '<stage_id>\.<field>'$",
    ):
        p.build()


def test_wrong_type_is_rejected() -> None:
    p = Pipeline("p").add(tokens).add(tts)  # int -> str
    with pytest.raises(
        PipelineValidationError,
        match=r"^stage 'tb_tts' input field 'text' expects str, but 'tb_tokens\.text' is int "
        r"\(types differ\); change one of the models or map another field$",
    ):
        p.build()


def test_wrong_dtype_is_rejected() -> None:
    p = Pipeline("p").add(llm).add(tts16).add(vocoder)
    with pytest.raises(
        PipelineValidationError,
        match=re.escape(
            "stage 'tb_vocoder' input field 'mel' expects Array['float32', (None, 80)], but "
            "'tb_tts16.mel' is Array['float16', (None, 80)] (dtypes differ); change one of "
            "the models or map another field"
        ),
    ):
        p.build()


def test_wrong_shape_is_rejected() -> None:
    p = Pipeline("p").add(llm).add(tts64).add(vocoder)
    with pytest.raises(
        PipelineValidationError,
        match=r"^stage 'tb_vocoder' input field 'mel' expects Array\['float32', \(None, 80\)\], "
        r"but 'tb_tts64\.mel' is Array\['float32', \(None, 64\)\] \(shapes differ\);",
    ):
        p.build()


def test_unknown_source_field_is_rejected() -> None:
    p = Pipeline("p").add(llm).add(tts, inputs={"text": "tb_llm.txt"})
    with pytest.raises(
        PipelineValidationError,
        match=r"^stage 'tb_tts' input field 'text' reads 'tb_llm\.txt', but stage 'tb_llm' "
        r"outputs no field 'txt' \(output fields of Text: 'text'\)$",
    ):
        p.build()


def test_unknown_target_field_is_rejected() -> None:
    p = Pipeline("p").add(llm).add(tts, inputs={"text": "tb_llm.text", "txt": "tb_llm.text"})
    with pytest.raises(
        PipelineValidationError,
        match=r"^stage 'tb_tts' has no input field 'txt' \(input fields of Text: 'text'\)$",
    ):
        p.build()


def test_unknown_source_stage_is_rejected() -> None:
    p = Pipeline("p").add(llm).add(tts, inputs={"text": "lm.text"})
    with pytest.raises(
        PipelineValidationError,
        match=r"^stage 'tb_tts' input field 'text' reads 'lm\.text', but there is no stage "
        r"'lm' \(stages: 'tb_llm', 'tb_tts'\)$",
    ):
        p.build()


def test_malformed_source_is_rejected() -> None:
    p = Pipeline("p").add(llm, inputs={"prompt": "prompt"})
    with pytest.raises(PipelineValidationError, match=r"^stage 'tb_llm' input field 'prompt' "):
        p.build()


def test_unknown_stage_in_a_spec_is_rejected_naming_the_entry() -> None:
    spec = PipelineSpec.model_validate(
        {"name": "s", "stages": [{"id": "a", "stage": "tb_llm"}, {"id": "b", "stage": "nope"}]}
    )
    with pytest.raises(
        PipelineValidationError,
        match=r"^pipeline spec 's' entry 'b' \(stages\[1\]\) names stage 'nope', which is not "
        r"registered \(registered: .*'tb_llm'.*\); specs never import code",
    ):
        spec.build()


def test_unknown_context_name_is_rejected(host_rt: Runtime) -> None:
    p = Pipeline("p", runtime=host_rt).add(llm, context="gpt")
    with pytest.raises(
        PipelineValidationError,
        match=r"^stage 'tb_llm' runs in context 'gpt', but its runtime has no live context of "
        r"that name \(live: none\); create it with create_context\('gpt', max_vram=\.\.\.\) "
        r"before building the pipeline$",
    ):
        p.build()


def test_two_streams_into_one_stage_are_rejected() -> None:
    p = (
        Pipeline("p")
        .add(llm_stream, id="a", inputs={"prompt": "$input.prompt"})
        .add(llm_stream, id="b", inputs={"prompt": "$input.prompt"})
        .add(mix, inputs={"text": "a.text", "caption": "b.text"})
    )
    with pytest.raises(
        PipelineValidationError, match=r"^stage 'tb_mix' reads items streamed by both 'a' and 'b'"
    ):
        p.build()


def test_conflicting_request_fields_are_rejected() -> None:
    p = Pipeline("p").add(llm).add(tts, inputs={"text": "$input.max_tokens"})
    with pytest.raises(
        PipelineValidationError,
        match=r"^request field 'max_tokens' is read as int by stage 'tb_llm' and as str by "
        r"stage 'tb_tts'; map them to different '\$input\.<field>' names$",
    ):
        p.build()


def test_duplicate_ids_and_outputs_are_rejected() -> None:
    p = Pipeline("p").add(llm)
    with pytest.raises(
        PipelineValidationError,
        match=r"^pipeline 'p' already has a stage with id 'tb_llm'; pass add\(\.\.\., "
        r"id='another_id'\)$",
    ):
        p.add(llm)
    with pytest.raises(PipelineValidationError, match=r"^pipeline 'p' output stage 'x' is not"):
        p.output("x").build()
    with pytest.raises(PipelineValidationError, match=r"^pipeline 'q' has no stages"):
        Pipeline("q").build()


# -- stage declarations -----------------------------------------------------------------


def test_stage_signatures_are_checked_at_decoration() -> None:
    with pytest.raises(
        PipelineValidationError,
        match=r"^stage function '.*sync_fn' must be 'async def' returning a pydantic model",
    ):

        @stage("tb_bad1")
        def sync_fn(inp: Text) -> Text:
            return inp

    with pytest.raises(
        PipelineValidationError,
        match=r"^stage function '.*two' must take exactly one positional argument \(its input "
        r"model\), not 2 parameters$",
    ):

        @stage("tb_bad2")
        async def two(a: Text, b: Text) -> Text:
            return a

    with pytest.raises(PipelineValidationError, match=r"^stage function '.*ret' must return"):

        @stage("tb_bad3")
        async def ret(inp: Text) -> str:
            return ""

    with pytest.raises(PipelineValidationError, match=r"is not an async generator"):

        @stage("tb_bad4")
        async def not_gen(inp: Text) -> AsyncIterator[Text]:
            raise NotImplementedError

    assert not any(n.startswith("tb_bad") for n in registry.names())


def test_local_models_resolve_and_names_are_unique() -> None:
    class Local(BaseModel):
        x: int

    @stage("tb_local")
    async def local(inp: Local) -> Local:
        return inp

    assert local.input_model is Local and not local.streaming
    assert registry.get("tb_local") is local
    with pytest.raises(
        PipelineValidationError, match=r"^a stage named 'tb_local' is already registered"
    ):

        @stage("tb_local")
        async def other(inp: Local) -> Local:
            return inp

    registry.unregister("tb_local")
    assert "tb_local" not in registry


def test_array_dtype_may_be_named_by_string() -> None:
    # In annotations type checkers read a string as a forward reference, so a string dtype
    # is best spelled through an alias.
    mel_by_name = Array["float32", (None, 80)]
    assert mel_by_name == Array[np.float32, (None, 80)]

    class NamedMel(BaseModel):
        mel: mel_by_name  # type: ignore[valid-type]

    @stage("tb_named_mel")
    async def named(inp: NamedMel) -> Mel:
        return Mel(mel=inp.mel)

    try:
        Pipeline("p").add(llm).add(tts).add(named).add(vocoder).build()
    finally:
        registry.unregister("tb_named_mel")


def test_array_fields_check_values() -> None:
    Mel(mel=np.zeros((7, 80), np.float32))
    with pytest.raises(pydantic.ValidationError, match=r"expected dtype float32"):
        Mel(mel=np.zeros((7, 80), np.float64))
    with pytest.raises(pydantic.ValidationError, match=r"expected shape \(None, 80\)"):
        Mel(mel=np.zeros((7, 81), np.float32))
    with pytest.raises(pydantic.ValidationError, match=r"expected an array"):
        Mel(mel=[[0.0] * 80])
    with pytest.raises(InvalidArgument, match=r"^Array dtype 'floaty' is not a dtype"):
        Array["floaty", (None,)]
