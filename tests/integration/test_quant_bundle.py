"""Quantized bundles on the tiny families: the parity gate at the preset's thresholds, smaller
artifacts, and the artifact holding exactly the QuantResult's integers and scales."""

import json
from pathlib import Path

import pytest
import torch

from omni_export.bundle import read_manifest, verify_bundle
from omni_export.profiles import get_profile
from omni_export.quantize.result import QuantResult
from omni_export.targets.pte_weights import read_quantized_weights

# InteractiveOmni at int4 holds both XNNPACK weight formats (4-bit blockwise decoders, 8-bit
# per-channel encoders); VITA at int8 repeats the per-channel case on the other family (slow).
CASES = {"interactiveomni": "int4", "vita15": "int8"}
FAMILIES = [pytest.param("interactiveomni"), pytest.param("vita15", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def qbundles(quant_bundles):
    return lambda family: quant_bundles("android", family, CASES[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_bundle_passes_its_thresholds(qbundles, family):
    result = qbundles(family)
    preset = CASES[family]
    assert result.precision == preset
    profile = get_profile("android")
    for b in result.components:
        assert b.parity.passed, (b.name, b.parity.failures)
        # Each component is held to the threshold of the precision its weights got.
        assert b.parity.threshold["cosine_min"] == profile.threshold(b.precision).cosine_min
        assert b.parity.gate_reference == ("fp32" if b.precision == "fp32" else "fp16")
    root = result.bundle
    assert verify_bundle(root) == []
    m = read_manifest(root)
    assert m.quant.recipe == preset
    llm = m.components["llm"]
    assert llm.quant.linears > 0 and "int8 dynamic" in llm.quant.activations
    expected = {"int4": {"llm": "int4", "vision_encoder": "int8", "vocoder": "fp32"}, "int8": {"llm": "int8", "codec_decoder": "fp32"}}[preset]
    assert {n: m.components[n].precision for n in expected} == expected
    report = json.loads((root / "reports" / "quant.json").read_text())
    assert all("weight_rel_err" in v for v in report["layers"].values())


def _assert_artifact_holds(pte, tensors):
    """Every quantized weight of the component is in the .pte with identical codes and scales."""
    stored = read_quantized_weights(pte)
    assert len(stored) == len(tensors), (len(stored), len(tensors))
    unmatched = dict(tensors)
    for w in stored:
        hit = next((name for name, t in unmatched.items()
                    if t.q.shape == w.q.shape and t.config.bits == w.bits and torch.equal(t.q, w.q)), None)  # fmt: skip
        assert hit is not None, f"a {w.bits}-bit weight {tuple(w.q.shape)} in {pte.name} matches no QuantResult tensor"
        assert torch.equal(unmatched[hit].scale, w.scale), f"{hit}: scales differ"
        del unmatched[hit]
    assert not unmatched


@pytest.mark.parametrize("family", FAMILIES)
def test_artifacts_hold_exactly_the_quant_result(qbundles, family):
    root = qbundles(family).bundle
    report = json.loads((root / "reports" / "quant.json").read_text())
    result = QuantResult.load(Path(report["cache"]))
    m = read_manifest(root)
    bits = set()
    for name, comp in m.components.items():
        tensors = result.for_component(name)
        if tensors:
            _assert_artifact_holds(root / comp.files[0], tensors)
            bits |= {t.config.bits for t in tensors.values()}
    assert bits == ({4, 8} if CASES[family] == "int4" else {8})


def test_int4_llm_artifact_is_smaller(qbundles, bundles):
    q = {b.name: b.bytes for b in qbundles("interactiveomni").components}
    f = {b.name: b.bytes for b in bundles["interactiveomni"].components}
    assert q["llm"] < 0.6 * f["llm"], (q["llm"], f["llm"])
