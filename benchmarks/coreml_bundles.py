"""What Core ML bundles hold, per component: package size, conversion time, functions, which
functions run off the Neural Engine and why, layers measured and kept in fp32, quantized weights
stored as constexpr_blockwise_shift_scale. Reads bundles built by the main job, e.g.

    for q in int4 int8 fp16; do .venv/bin/omni-export --target iphone --quant $q --out /tmp/cm/demo-$q; done
    .venv/bin/python benchmarks/coreml_bundles.py /tmp/cm/demo-int4 /tmp/cm/demo-int8 /tmp/cm/demo-fp16

Prints a table and JSON (docs/coreml/demo-bundles.json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omni_export.bundle import read_manifest
from omni_export.targets.coreml_package import load_spec, quantized_weight_ops


def describe(bundle: Path) -> list[dict]:
    m = read_manifest(bundle)
    build = {c["component"]: c for c in json.loads((bundle / "reports" / "build.json").read_text())["components"]}
    rows = []
    for name, c in m.components.items():
        b = build[name]
        package = bundle / c.methods[next(iter(c.methods))].entry.split("#")[0]
        layers = b.get("fp32_layers") or []
        summary = next((x for x in layers if "measured_layers" in x), {})
        worst = summary.get("worst_kept_fp16") or {}
        rows.append({
            "preset": m.quant.recipe, "component": name, "precision": c.precision,
            "package_mb": round(sum(m.files[f].bytes for f in c.files) / 1e6, 2), "convert_s": round(b["lower_s"], 1),
            "functions": list(c.methods),
            "off_neural_engine": {k: e.compute_units_reason for k, e in c.methods.items() if e.compute_units},
            "enumerated": {k: {d: list(v) for d, v in e.enumerated.items()} for k, e in c.methods.items() if e.enumerated},
            "measured_layers": summary.get("measured_layers", 0),
            "kept_fp32": [x["path"] for x in layers if "path" in x and "measured_layers" not in x],
            "worst_fp16_layer": f"{worst['rel_err']:.1e} ({worst['path']})" if worst else "-",
            "quantized_weight_ops": len(quantized_weight_ops(load_spec(package))),
        })  # fmt: skip
    return rows


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    rows = [r for arg in sys.argv[1:] for r in describe(Path(arg))]
    t = Table(title="Core ML bundles")
    for col in ("preset", "component", "precision", "package", "convert s", "off the ANE", "kept fp32 / measured", "worst fp16 layer", "weight ops"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["preset"], r["component"], r["precision"], f"{r['package_mb']:.2f} MB", f"{r['convert_s']:.1f}",
                  ", ".join(r["off_neural_engine"]) or "-", f"{len(r['kept_fp32'])} / {r['measured_layers']}", r["worst_fp16_layer"],
                  str(r["quantized_weight_ops"]))  # fmt: skip
    Console(width=170).print(t)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
