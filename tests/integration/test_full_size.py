"""Full-size (4B / 8B / 7B-shaped) synthetic checkpoints: written in bounded RAM, loaded back
memory-mapped. Minutes and ~50 GB of disk: marked slow."""

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from full_checkpoint import measure  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family,size,params", [
    ("interactiveomni", "full", 5.42e9), ("vita15", "full", 8.51e9), ("interactiveomni", "full-8b", 9.62e9),
])  # fmt: skip
def test_full_checkpoint_writes_and_loads_in_bounded_ram(tmp_path, family, size, params):
    r = measure(family, size, tmp_path / "ckpt")
    print(r)  # the figures, for the record (-s)
    shutil.rmtree(tmp_path / "ckpt")
    assert abs(r["params"] - params) / params < 0.01
    # Writing holds one 2 GB shard plus the largest tensor being generated, never the model.
    assert r["write_peak_rss_gib"] < 8
    # Loading maps the files: RSS is what one prefill touched, well under the bf16 weights.
    assert r["load_peak_rss_gib"] < r["disk_gb"] * 1e9 / 2**30 * 1.1
