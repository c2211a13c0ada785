"""A bundle that cannot lie: manifests, golden files and artifacts mutated (wrong types, values
outside what was built, truncation, swapped files, files re-hashed so the sha256 check alone
cannot see it) always end in a clear error from `verify`, `parity` or `run`, never a traceback."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from omni_export.cli import app

runner = CliRunner()


def _resign(root: Path) -> None:
    """Re-hash every listed file into the manifest, as someone covering an edit would."""
    m = json.loads((root / "manifest.json").read_text())
    for rel in m["files"]:
        data = (root / rel).read_bytes()
        m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (root / "manifest.json").write_text(json.dumps(m))


def _edit(fn):  # type: ignore[no-untyped-def]
    def apply(root: Path) -> None:
        m = json.loads((root / "manifest.json").read_text())
        fn(m)
        (root / "manifest.json").write_text(json.dumps(m))

    return apply


def _truncate(rel: str, resign: bool):  # type: ignore[no-untyped-def]
    def apply(root: Path) -> None:
        data = (root / rel).read_bytes()
        (root / rel).write_bytes(data[: len(data) // 3])
        if resign:
            _resign(root)

    return apply


def _swap(a: str, b: str):  # type: ignore[no-untyped-def]
    def apply(root: Path) -> None:
        pa, pb = root / a, root / b
        tmp = pa.read_bytes()
        pa.write_bytes(pb.read_bytes())
        pb.write_bytes(tmp)
        _resign(root)

    return apply


def _set(path: tuple, value):  # type: ignore[no-untyped-def]
    def fn(m):  # type: ignore[no-untyped-def]
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return _edit(fn)


def _del(path: tuple):  # type: ignore[no-untyped-def]
    def fn(m):  # type: ignore[no-untyped-def]
        node = m
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]

    return _edit(fn)


# (name, mutation, the command that must refuse it, a phrase its message holds)
MUTATIONS = {
    "eos id outside the vocabulary": (_set(("model", "eos_ids"), [10**6]), "verify", "outside the LLM's vocabulary"),
    "eos ids of the wrong type": (_set(("model", "eos_ids"), "2"), "verify", "model.eos_ids"),
    "context beyond the traced cache": (_set(("model", "max_context"), 10**5), "verify", "beyond component"),
    "files of the wrong type": (_set(("files",), ["artifacts"]), "verify", "malformed"),
    "a file entry of the wrong type": (_edit(lambda m: m["files"].update({k: 7 for k in list(m["files"])[:1]})), "verify", "malformed"),
    "no components": (_del(("components",)), "verify", "malformed"),
    "schema version as text": (_set(("schema_version",), "2"), "verify", "schema_version"),
    "a method pointing nowhere": (_set(("components", "llm", "methods", "embed", "entry"), "nowhere"), "verify", "llm"),
    "manifest cut short": (_truncate("manifest.json", resign=False), "verify", "manifest.json"),
    "artifact cut short": (None, "verify", "manifest says"),  # filled per bundle below
    "artifact cut short, re-hashed": (None, "verify", "component"),
    "artifacts swapped, re-hashed": (None, "verify", "component"),
    "golden cut short, re-hashed": (_truncate("golden/llm.npz", resign=True), "parity", "golden"),
    "tokenizer cut short, re-hashed": (_truncate("tokenizer/tokenizer.json", resign=True), "run", "tokenizer"),
}


def _artifact(root: Path, component: str) -> str:
    m = json.loads((root / "manifest.json").read_text())
    files = m["components"][component]["files"]
    return next((f for f in files if f.endswith((".pte", ".data"))), files[0])


@pytest.mark.parametrize("kind", ["ort", "et"])
def test_every_mutation_ends_in_a_clear_error_never_a_traceback(ort_bundles, bundles, tmp_path, kind):
    source = (ort_bundles if kind == "ort" else bundles)["interactiveomni"].bundle
    assert runner.invoke(app, ["verify", str(source)]).exit_code == 0
    for name, (mutate, command, phrase) in MUTATIONS.items():
        root = tmp_path / name.replace(" ", "-").replace(",", "")
        shutil.copytree(source, root)
        if mutate is None:
            llm, vision = _artifact(root, "llm"), _artifact(root, "vision_encoder")
            if kind == "ort":  # the graphs (an .onnx), not the shared weight file
                llm, vision = (json.loads((root / "manifest.json").read_text())["components"][c]["methods"]["embed" if c == "llm" else "forward"]["entry"]
                               for c in ("llm", "vision_encoder"))  # fmt: skip
            mutate = {"artifact cut short": _truncate(llm, resign=False), "artifact cut short, re-hashed": _truncate(llm, resign=True),
                      "artifacts swapped, re-hashed": _swap(llm, vision)}[name]  # fmt: skip
        mutate(root)
        args = {"verify": ["verify", str(root)], "parity": ["parity", str(root)],
                "run": ["run", str(root), "--text", "hello", "--out", str(tmp_path / f"{root.name}.wav"), "--max-new-tokens", "2"]}[command]  # fmt: skip
        if command != "verify":  # a re-hashed edit that only its reader can see: verify passes, the reader refuses
            assert runner.invoke(app, ["verify", str(root)]).exit_code == 0, name
        r = runner.invoke(app, args)
        assert r.exit_code not in (0, None), (name, r.output[-500:])
        assert r.exception is None or isinstance(r.exception, SystemExit), (name, repr(r.exception))
        assert "Traceback" not in r.output and phrase in r.output, (name, r.output[-800:])
