"""VITA-1.5's Whale audio encoder: the released tensor names and shapes, and its attention's
maths against the release's formula written out with explicit loops."""

import math

import torch

from omni_export.export.components.whale import RelPositionAttention, WhaleConfig, WhaleEncoder, abs_positions
from omni_export.export.synthetic import written_layout


def _released_whale_names() -> dict[str, tuple[int, ...]]:
    """VITA-1.5's audio encoder as its full checkpoint stores it under ``model.audio_encoder.``
    (whale/module/encoder/encoder.py, subsampling.py, transformer.py, attention.py, adapter.py;
    24 blocks of 1024, 16 heads, 4096 units, 80 mel bins, the adapter to Qwen2.5-7B's 3584),
    written out from the release, not from our module."""
    d, ffn, heads = 1024, 4096, 16
    t: dict[str, tuple[int, ...]] = {}

    def linear(name, out, inp, bias=True):
        t[f"{name}.weight"] = (out, inp)
        if bias:
            t[f"{name}.bias"] = (out,)

    def norm(name, n):
        t[f"{name}.weight"], t[f"{name}.bias"] = (n,), (n,)

    e = "encoder.enc"
    t[f"{e}.0.core.conv.0.weight"], t[f"{e}.0.core.conv.0.bias"] = (d, 1, 3, 3), (d,)
    t[f"{e}.0.core.conv.2.weight"], t[f"{e}.0.core.conv.2.bias"] = (d, d, 3, 3), (d,)
    linear(f"{e}.0.core.out.0", d, d * 19)  # 80 bins -> 39 -> 19 after two 3x3 stride-2 convs
    linear(f"{e}.1.embed.0", d, d)
    norm(f"{e}.1.embed.1", d)
    for i in range(24):
        p = f"{e}.1.encoders.{i}"
        for proj in ("linear_q", "linear_k", "linear_v", "linear_out"):
            linear(f"{p}.self_attn.{proj}", d, d)
        linear(f"{p}.self_attn.linear_pos", d, d, bias=False)
        t[f"{p}.self_attn.pos_bias_u"] = t[f"{p}.self_attn.pos_bias_v"] = (heads, d // heads)
        linear(f"{p}.feed_forward.w_1", ffn, d)
        linear(f"{p}.feed_forward.w_2", d, ffn)
        norm(f"{p}.norm1", d)
        norm(f"{p}.norm2", d)
    norm(f"{e}.1.after_norm", d)
    t["encoder.global_cmvn.mean"] = t["encoder.global_cmvn.istd"] = (80,)
    t["adpter.conv1d2.weight"], t["adpter.conv1d2.bias"] = (2048, d, 5), (2048,)
    norm("adpter.bn2", 2048)
    linear("adpter.project", 3584, 2048)
    return t


def test_synthetic_writer_and_loader_use_the_released_whale_names():
    written = written_layout("vita15", "audio_encoder", strip="model.audio_encoder.")
    released = _released_whale_names()
    assert sorted(set(written) ^ set(released)) == []
    assert written == released


def test_attention_is_the_releases_with_the_relative_shift_off():
    """scores[h, i, j] = ((q_i + u_h) . k_j + (q_i + v_h) . p_j) / sqrt(d_k), p_j = linear_pos(pe[j]),
    pe the sin/cos table (sin at even columns): the release's formula, one score at a time."""
    torch.manual_seed(0)
    d, heads, t = 16, 2, 5
    attn = RelPositionAttention(d, heads)
    for prm in (attn.pos_bias_u, attn.pos_bias_v):
        torch.nn.init.normal_(prm)
    x = torch.randn(1, t, d)
    pe = torch.zeros(t, d)
    for pos in range(t):
        for i in range(0, d, 2):
            pe[pos, i] = math.sin(pos / 10000 ** (i / d))
            pe[pos, i + 1] = math.cos(pos / 10000 ** (i / d))
    assert torch.allclose(abs_positions(t, d), pe, atol=1e-6)
    dk = d // heads
    q, k, v, p = attn.linear_q(x)[0], attn.linear_k(x)[0], attn.linear_v(x)[0], attn.linear_pos(pe)
    out = torch.zeros(t, d)
    for h in range(heads):
        sl = slice(h * dk, (h + 1) * dk)
        scores = torch.tensor([[((q[i, sl] + attn.pos_bias_u[h]) @ k[j, sl] + (q[i, sl] + attn.pos_bias_v[h]) @ p[j, sl]).item()
                                for j in range(t)] for i in range(t)]) / math.sqrt(dk)  # fmt: skip
        out[:, sl] = torch.softmax(scores, -1) @ v[:, sl]
    with torch.no_grad():
        assert torch.allclose(attn(x, pe), attn.linear_out(out)[None], atol=1e-5)


def test_the_encoder_subsamples_by_four_with_the_releases_epsilons():
    cfg = WhaleConfig(output_size=32, attention_heads=2, linear_units=64, num_blocks=1)
    enc = WhaleEncoder(cfg).eval()
    with torch.no_grad():
        y = enc(torch.randn(1, 103, 80))
        core = enc.enc[0](torch.randn(1, 103, 80))
    assert y.shape == (1, 25, 32) and core.shape == (1, 25, 32)  # ((103 - 1) // 2 - 1) // 2
    assert enc.enc[1].embed[1].eps == 1e-5 and enc.enc[1].after_norm.eps == 1e-5
