"""The typed manifest: it round-trips, refuses what it does not know with a message instead of a
traceback, refuses schema 1 saying to rebuild, and its JSON Schema accepts what it writes."""

import json

import pytest

from omni_export.bundle.manifest import (
    BundleError,
    ComponentEntry,
    FileEntry,
    KVLayout,
    Manifest,
    MethodEntry,
    ProfileEntry,
    QuantEntry,
    RuntimeSettings,
    Source,
    TensorSpec,
    parse_manifest,
    schema,
)


MODEL = {"eos_ids": [3], "image_token_id": 5, "audio_token_id": 8, "max_context": 320, "prefill_chunk": 256}


def _manifest() -> Manifest:
    step = "artifacts/llm/step.onnx"
    kv = KVLayout("io", 2, 2, 16, 320, "float32", ("batch", "kv_heads", "positions", "head_dim"), ("prefill", "decode"),
                  ("past_key_0", "past_value_0", "past_key_1", "past_value_1"),
                  ("present_key_0", "present_value_0", "present_key_1", "present_value_1"))  # fmt: skip
    prefill = MethodEntry((TensorSpec("embeds", "float32", (1, "tokens", 64)), TensorSpec("input_pos", "int64", ("tokens",))),
                          (TensorSpec("logits", "float32", (1, "tokens", 640)),), step, 1234.0)  # fmt: skip
    llm = ComponentEntry("onnxruntime", (step, "artifacts/llm/llm.onnx.data"), {"prefill": prefill, "decode": prefill},
                         "decoder", "int4", "golden/llm.npz", "onnxruntime", kv_cache=kv)  # fmt: skip
    files = {f: FileEntry("0" * 64, 1) for f in (*llm.files, "golden/llm.npz")}
    return Manifest(2, {"omni_export": "0.2.0"}, "interactiveomni", Source("/ckpt", "f" * 64),
                    ProfileEntry("desktop-cpu", "onnxruntime", "desktop", 320, 51.2, RuntimeSettings(threads=0, providers=("CPUExecutionProvider",))),
                    QuantEntry("int4", "fp32", ()), MODEL, {"llm": llm}, files)  # fmt: skip


def test_round_trip():
    m = _manifest()
    assert parse_manifest(json.loads(m.to_json())) == m


def test_the_json_schema_accepts_what_is_written_and_rejects_unknown_keys():
    jsonschema = pytest.importorskip("jsonschema")
    data = json.loads(_manifest().to_json())
    jsonschema.validate(data, schema())
    data["components"]["llm"]["colour"] = "red"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema())


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d["components"]["llm"].update(colour="red"), "unknown key(s) ['colour']"),
        (lambda d: d.update(files=["a", "b"]), "files: expected a table"),
        (lambda d: d["components"]["llm"].update(files="artifacts/llm/step.onnx"), "expected a list"),
        (lambda d: d["components"]["llm"]["kv_cache"].update(layers="two"), "kv_cache.layers: expected int"),
        (lambda d: d["files"].pop("golden/llm.npz"), "golden file 'golden/llm.npz' is not listed"),
        (lambda d: d["components"]["llm"]["kv_cache"].update(methods=["prefill", "generate"]), "'generate' is not one of its methods"),
        (lambda d: d.update(schema_version=1), "schema 1 bundle (omni-export 0.1)"),
        (lambda d: d.update(schema_version=7), "schema_version 7 is not 2"),
    ],
)
def test_malformed_manifests_are_named_not_tracebacks(edit, message):
    data = json.loads(_manifest().to_json())
    edit(data)
    with pytest.raises(BundleError) as exc:
        parse_manifest(data)
    assert message in str(exc.value)
    if "schema 1" in message:
        assert "rebuild it" in str(exc.value)


def test_kv_layout_shapes_from_its_axes():
    kv = _manifest().components["llm"].kv_cache
    assert kv.shape(0) == (1, 2, 0, 16) and kv.shape(5) == (1, 2, 5, 16)
