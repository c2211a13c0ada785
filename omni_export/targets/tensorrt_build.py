"""Build this bundle's TensorRT engines on the device that will run them.

    python tensorrt/build_engines.py [BUNDLE] [--only COMPONENT] [--force]

Needs only TensorRT's Python package (JetPack ships it) and the Python standard library. Reads
``tensorrt/build_plan.json``: for every graph, its optimization profiles (min / opt / max of each
input), the workspace limit and the GPU the bundle was exported for. Networks are strongly
typed: the ONNX graph's dtypes are the precision (fp16 body, fp32 where measured necessary,
int4/int8 weights as DequantizeLinear). One timing cache per GPU and TensorRT version (in the
user's cache directory, not the bundle) serves every engine and every bundle, so rebuilding is
fast. Writes ``engines/COMPONENT/GRAPH.engine`` and records each in ``manifest.json``'s
``device_files`` (built from which graph, with which TensorRT, on which GPU, its sha256), so
``omni-export verify`` checks engines like every other file.

``omni-export build-engines BUNDLE`` runs this same file, then records the engines in the
manifest and checks their parity against the golden data."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

PLAN = "tensorrt/build_plan.json"
MANIFEST = "manifest.json"


class BuildError(RuntimeError):
    """An engine could not be built; the message says which and why."""


def gpu() -> tuple[str, str | None]:
    """(the GPU's name, its SM as ``sm_XY``, None when unknown)."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"sm_{major}{minor}"
    except ImportError:
        pass
    model = Path("/proc/device-tree/model")
    if model.is_file():  # Jetson
        return model.read_text().strip("\0 \n"), None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        name, cap = out.stdout.strip().splitlines()[0].split(", ")
        return name, "sm_" + cap.replace(".", "")
    except (OSError, IndexError, ValueError, subprocess.SubprocessError):
        return "unknown GPU", None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def timing_cache_path(gpu_name: str, version: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "omni-export" / "tensorrt"
    safe = "".join(ch if ch.isalnum() else "-" for ch in gpu_name)
    return base / f"timing-{safe}-trt{version}.cache"


def record(root: Path, built: list[dict]) -> None:
    """Each engine into the manifest's ``device_files`` (rewritten atomically)."""
    manifest = json.loads((root / MANIFEST).read_text())
    files = manifest.setdefault("device_files", {})
    for b in built:
        files[b["engine"]] = {k: v for k, v in b.items() if k != "engine"}
    _atomic_write(root / MANIFEST, json.dumps(manifest, indent=2).encode())


def build_one(trt, builder, logger, root: Path, plan: dict, entry: dict, cache) -> bytes:  # type: ignore[no-untyped-def]
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(root / entry["onnx"])):  # external data is read beside the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"{entry['onnx']}: TensorRT's ONNX parser refused it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan["workspace_mb"]) << 20)
    config.set_timing_cache(cache, False)
    for p in entry["profiles"]:
        profile = builder.create_optimization_profile()
        for name, s in p["shapes"].items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"{entry['onnx']}: TensorRT could not build an engine (see the log lines above)")
    return bytes(serialized)


def _built(entry: dict, out: Path, version: str, device: str, when: datetime) -> dict:
    """What the manifest records of one engine file."""
    return {"engine": entry["engine"], "component": entry["component"], "built_from": entry["onnx"], "builder": "tensorrt",
            "builder_version": version, "device": device, "sha256": sha256(out), "bytes": out.stat().st_size,
            "built_at": when.isoformat(timespec="seconds")}  # fmt: skip


def record_existing(root: Path) -> list[dict]:
    """Record engines already built (by trtexec) in the manifest, as ``build_all`` would."""
    import tensorrt as trt

    root = Path(root)
    plan = json.loads((root / PLAN).read_text())
    name, _ = gpu()
    found = [_built(e, root / e["engine"], trt.__version__, name, datetime.fromtimestamp((root / e["engine"]).stat().st_mtime, timezone.utc))
             for e in plan["engines"] if (root / e["engine"]).is_file()]  # fmt: skip
    record(root, found)
    return found


def build_all(root: Path, only: set[str] | None = None, force: bool = False, say=print) -> list[dict]:  # type: ignore[no-untyped-def]
    """Build every engine of the plan (``only``: those components); returns what was built."""
    import tensorrt as trt

    root = Path(root)
    plan = json.loads((root / PLAN).read_text())
    name, sm = gpu()
    if sm is not None and sm != plan["sm_arch"] and not force:
        raise BuildError(f"this bundle was exported for {plan['device']} ({plan['sm_arch']}); this GPU is {name} ({sm}). "
                         "Engines only run on the GPU that builds them: export for this device's profile, or pass --force")  # fmt: skip
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    config = builder.create_builder_config()
    cache_path = timing_cache_path(name, trt.__version__)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    built = []
    engines = [e for e in plan["engines"] if only is None or e["component"] in only]
    for i, entry in enumerate(engines, 1):
        say(f"[{i}/{len(engines)}] {entry['component']}/{entry['graph']}: building ({len(entry['profiles'])} optimization profile(s)) ...")
        start = time.perf_counter()
        data = build_one(trt, builder, logger, root, plan, entry, cache)
        out = root / entry["engine"]
        _atomic_write(out, data)
        built.append(_built(entry, out, trt.__version__, name, datetime.now(timezone.utc)))
        say(f"[{i}/{len(engines)}] {entry['component']}/{entry['graph']}: {out.stat().st_size / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s")
        _atomic_write(cache_path, bytes(cache.serialize()))
        record(root, built[-1:])  # one at a time: an interrupted run keeps what it finished
    return built


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build this bundle's TensorRT engines on this device.")
    ap.add_argument("bundle", nargs="?", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--only", action="append", help="build only this component (repeatable)")
    ap.add_argument("--force", action="store_true", help="build even on a GPU other than the plan's")
    ap.add_argument("--record", action="store_true", help="build nothing: record engines already built (by trtexec) in the manifest")
    args = ap.parse_args(argv)
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        print(f"TensorRT's Python package is not importable here ({exc}); run this on the device (JetPack ships it)", file=sys.stderr)
        return 3
    try:
        if args.record:
            print(f"recorded {len(record_existing(Path(args.bundle)))} engine(s)")
        else:
            build_all(Path(args.bundle), set(args.only) if args.only else None, args.force)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
