"""This host's memory read bandwidth: the denominator of every roofline on it."""

import torch

SIZE_BYTES = 1 << 30


def test_read_bandwidth(benchmark):
    x = torch.ones(SIZE_BYTES // 4, dtype=torch.float32)
    x.sum()  # fault the pages in first
    benchmark.pedantic(lambda: x.sum(), rounds=10, warmup_rounds=2)
    gbs = SIZE_BYTES / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update({"read_GBps": round(gbs, 2), "threads": torch.get_num_threads()})
    print(f"\nread bandwidth: {gbs:.1f} GB/s with {torch.get_num_threads()} threads")
    assert gbs > 0
