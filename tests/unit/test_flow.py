"""CosyVoice2's flow: the released tensor names and shapes, the encoder's relative-position
attention against the release's formula, the streamed chunks against the whole sequence, and
the checkpoint's saved default voice."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from omni_export.errors import CheckpointError
from omni_export.export.checkpoint import load_checkpoint
from omni_export.export.components.flow import FlowConfig, FlowDecoder
from omni_export.export.components.flow_encoder import ConformerLayer
from omni_export.export.components.flow_estimator import mish
from omni_export.export.components.layers import chunk_causal_mask
from omni_export.export.families.interactiveomni import default_voice
from omni_export.export.synthetic import written_layout


def _released_flow_names() -> dict[str, tuple[int, ...]]:
    """CosyVoice2-0.5B's flow.pt as cosyvoice2.yaml builds CausalMaskedDiffWithXvec
    (flow.py, upsample_encoder.py, decoder.py; Matcha-TTS's blocks), written out from the release."""
    t: dict[str, tuple[int, ...]] = {}

    def lin(name, out, inp, bias=True):
        t[f"{name}.weight"] = (out, inp)
        if bias:
            t[f"{name}.bias"] = (out,)

    def ln(name, d):
        t[f"{name}.weight"], t[f"{name}.bias"] = (d,), (d,)

    def conv(name, out, inp, k):
        t[f"{name}.weight"], t[f"{name}.bias"] = (out, inp, k), (out,)

    def conformer(p):
        for n in ("linear_q", "linear_k", "linear_v", "linear_out"):
            lin(f"{p}.self_attn.{n}", 512, 512)
        lin(f"{p}.self_attn.linear_pos", 512, 512, bias=False)
        t[f"{p}.self_attn.pos_bias_u"] = t[f"{p}.self_attn.pos_bias_v"] = (8, 64)
        lin(f"{p}.feed_forward.w_1", 2048, 512)
        lin(f"{p}.feed_forward.w_2", 512, 2048)
        ln(f"{p}.norm_ff", 512)
        ln(f"{p}.norm_mha", 512)

    def resnet(p, inp, out=256):
        lin(f"{p}.mlp.1", out, 1024)
        conv(f"{p}.block1.block.0", out, inp, 3)
        ln(f"{p}.block1.block.2", out)
        conv(f"{p}.block2.block.0", out, out, 3)
        ln(f"{p}.block2.block.2", out)
        conv(f"{p}.res_conv", out, inp, 1)

    def transformer(p):
        ln(f"{p}.norm1", 256)
        ln(f"{p}.norm3", 256)
        for n in ("to_q", "to_k", "to_v"):
            lin(f"{p}.attn1.{n}", 512, 256, bias=False)
        lin(f"{p}.attn1.to_out.0", 256, 512)
        lin(f"{p}.ff.net.0.proj", 1024, 256)
        lin(f"{p}.ff.net.2", 256, 1024)

    t["input_embedding.weight"] = (6561, 512)
    lin("spk_embed_affine_layer", 80, 192)
    lin("encoder_proj", 80, 512)
    for e in ("embed", "up_embed"):
        lin(f"encoder.{e}.out.0", 512, 512)
        ln(f"encoder.{e}.out.1", 512)
    ln("encoder.after_norm", 512)
    conv("encoder.pre_lookahead_layer.conv1", 512, 512, 4)
    conv("encoder.pre_lookahead_layer.conv2", 512, 512, 3)
    for i in range(6):
        conformer(f"encoder.encoders.{i}")
    conv("encoder.up_layer.conv", 512, 512, 5)
    for i in range(4):
        conformer(f"encoder.up_encoders.{i}")
    e = "decoder.estimator"
    lin(f"{e}.time_mlp.linear_1", 1024, 320)
    lin(f"{e}.time_mlp.linear_2", 1024, 1024)
    for level, inp in (("down_blocks.0", 320), ("up_blocks.0", 512)):
        resnet(f"{e}.{level}.0", inp)
        for j in range(4):
            transformer(f"{e}.{level}.1.{j}")
        conv(f"{e}.{level}.2", 256, 256, 3)
    for i in range(12):
        resnet(f"{e}.mid_blocks.{i}.0", 256)
        for j in range(4):
            transformer(f"{e}.mid_blocks.{i}.1.{j}")
    conv(f"{e}.final_block.block.0", 256, 256, 3)
    ln(f"{e}.final_block.block.2", 256)
    conv(f"{e}.final_proj", 80, 256, 1)
    return t


def test_synthetic_writer_and_loader_use_the_released_flow_names():
    written = written_layout("interactiveomni", "flow", strip="voicelm.flow.")
    released = _released_flow_names()
    assert sorted(set(written) ^ set(released)) == []
    assert written == released
    assert len(released) == 1121 and sum(math.prod(s) for s in released.values()) == 112_549_360


def _tiny(**kw) -> FlowDecoder:
    cfg = FlowConfig(**{**dict(dim=32, encoder_layers=2, up_layers=1, heads=2, ffn=64, estimator_dim=32, estimator_heads=2,
                               estimator_head_dim=16, estimator_blocks=1, estimator_mid_blocks=2, n_timesteps=4), **kw})  # fmt: skip
    flow = FlowDecoder(cfg).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in flow.parameters():  # weights large enough that every position's influence shows
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return flow


def test_conformer_attention_is_the_releases_relative_position_formula():
    """score(i, j) = [(q_i + u) . k_j + (q_i + v) . linear_pos(pe(i - j))] / sqrt(d_k), pe: ESPnet's
    sin/cos of the offset i - j at even/odd channels; masked to 25-token chunks."""
    torch.manual_seed(0)
    d, heads, n = 16, 2, 30
    layer = ConformerLayer(d, heads, 32).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape) * 0.5)
    x = torch.randn(1, n, d)
    att = layer.self_attn
    h = layer.norm_mha(x)[0]
    dk = d // heads
    q, k, v = (m(h).view(n, heads, dk) for m in (att.linear_q, att.linear_k, att.linear_v))
    div = torch.exp(torch.arange(0, d, 2) * -(math.log(10000.0) / d))

    def pe(off):
        row = torch.zeros(d)
        row[0::2], row[1::2] = torch.sin(off * div), torch.cos(off * div)
        return row

    mask = chunk_causal_mask(n, 25)
    out = torch.zeros(n, heads, dk)
    for i in range(n):
        for hh in range(heads):
            scores = torch.tensor([
                ((q[i, hh] + att.pos_bias_u[hh]) @ k[j, hh] + (q[i, hh] + att.pos_bias_v[hh]) @ att.linear_pos(pe(i - j)).view(heads, dk)[hh])
                / math.sqrt(dk) if mask[i, j] else float("-inf") for j in range(n)])  # fmt: skip
            out[i, hh] = torch.softmax(scores, 0) @ v[:, hh]
    x1 = x[0] + att.linear_out(out.reshape(n, d))
    want = x1 + layer.feed_forward.w_2(F.silu(layer.feed_forward.w_1(layer.norm_ff(x1))))
    from omni_export.export.components.relpos import relative_rows

    got = layer(x, relative_rows(n, n, d), mask)[0][0]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def _stream(flow: FlowDecoder, tokens: torch.Tensor, spks, noise):
    """The flow a chunk at a time, as the runtime calls it: (mu, mel)."""
    c, (C, L, r) = flow.cfg, (flow.cfg.token_chunk, flow.cfg.pre_lookahead, flow.cfg.token_mel_ratio)
    shapes = c.cache_shapes()
    enc = [torch.zeros(s) for s in shapes["encode"].values()]
    steps = [[torch.zeros(s) for s in shapes["step"].values()] for _ in range(c.n_timesteps)]
    ts, total = flow.timesteps(), tokens.shape[1]
    mus, mels = [], []
    for off in range(0, total, C):
        n = min(C, total - off)
        piece = tokens[:, off : off + C + L]
        at = (torch.tensor([off]), torch.tensor([piece.shape[1]]))
        mu, *enc = flow.encode_chunk(F.pad(piece, (0, C + L - piece.shape[1])), *at, *enc)
        x = F.pad(noise[..., r * off : r * (off + n)], (0, r * (C - n)))
        for i, (t0, t1) in enumerate(zip(ts[:-1], ts[1:])):
            x, *steps[i] = flow.step_chunk(x, mu, torch.tensor([t0]), torch.tensor(t1 - t0), spks, torch.zeros_like(mu), *steps[i], *at)
        mus.append(mu[..., : r * n])
        mels.append(x[..., : r * n])
    return torch.cat(mus, -1), torch.cat(mels, -1)


@pytest.mark.parametrize("tokens", [7, 53, 75])
def test_streamed_chunks_equal_the_whole_sequence(tokens):
    """Chunks of 25 tokens with their 3 look-ahead tokens, short at the end: the same mu and mel as
    one pass over the whole reply (block-causal masks, the look-ahead zero after the last token)."""
    flow = _tiny(left_chunks=2, estimator_left_chunks=2)
    g = torch.Generator().manual_seed(tokens)
    tok = torch.randint(0, 6561, (1, tokens), generator=g)
    spks = flow.speaker(torch.randn(1, 192, generator=g))
    noise = torch.randn(1, 80, 2 * tokens, generator=g)
    with torch.no_grad():
        mu = flow.encode(tok)
        mel = flow.solve(mu, spks, noise)
        mu_s, mel_s = _stream(flow, tok, spks, noise)
    assert mu.shape == mu_s.shape == (1, 80, 2 * tokens)
    assert torch.allclose(mu, mu_s, atol=1e-4), (mu - mu_s).abs().max()
    assert torch.allclose(mel, mel_s, atol=1e-3 * mel.abs().max()), (mel - mel_s).abs().max()


def test_past_the_estimators_window_only_later_frames_differ():
    flow = _tiny(left_chunks=4, estimator_left_chunks=1)
    g = torch.Generator().manual_seed(3)
    tok = torch.randint(0, 6561, (1, 100), generator=g)
    spks = flow.speaker(torch.randn(1, 192, generator=g))
    noise = torch.randn(1, 80, 200, generator=g)
    with torch.no_grad():
        mu_s, mel_s = _stream(flow, tok, spks, noise)
        mu, mel = flow.encode(tok), flow.solve(flow.encode(tok), spks, noise)
    exact = 2 * flow.cfg.exact_tokens
    assert exact == 100
    assert torch.allclose(mu, mu_s, atol=1e-4)  # the encoder's window (4 chunks) holds the reply
    assert torch.allclose(mel[..., :exact], mel_s[..., :exact], atol=1e-3 * mel.abs().max())
    assert (mel[..., exact:] - mel_s[..., exact:]).abs().max() > 1e-3  # the estimator no longer sees the start


def test_mish_as_exported_equals_torchs():
    x = torch.linspace(-30, 100, 5000)
    assert torch.allclose(mish(x), F.mish(x), atol=1e-6)
    assert torch.isfinite(mish(x.half())).all()


def test_default_voice_from_the_weights_or_spk2info(tiny, tmp_path):
    """A top-level ``default_speaker_embedding`` in the weights (loaded, not refused as unknown),
    else spk2info.pt, else none."""
    root = tmp_path / "ckpt"
    shutil.copytree(tiny["interactiveomni"].root, root)
    (root / "spk2info.pt").unlink()
    assert not default_voice(root / "spk2info.pt", 192).any()  # neither: no speaker
    emb = torch.randn(192)
    save_file({"default_speaker_embedding": emb}, root / "model-extra.safetensors")
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["weight_map"]["default_speaker_embedding"] = "model-extra.safetensors"
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = load_checkpoint(root)
    assert np.allclose(ckpt.family.assets(ckpt)["default_speaker_embedding"], emb.numpy())


def test_default_voice_from_spk2info(tmp_path):
    path = tmp_path / "spk2info.pt"
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    assert not default_voice(path, 192).any()  # no file: no speaker
    emb = torch.randn(1, 192)
    torch.save({"other": {"embedding": torch.zeros(1, 192)}, "default": {"embedding": emb, "speech_feat": torch.zeros(3, 80)}}, path)
    assert np.allclose(default_voice(path, 192), emb[0].numpy())
    torch.save({"default": {"embedding": torch.zeros(1, 80)}}, path)
    with pytest.raises(CheckpointError, match="'embedding' of 192 values"):
        default_voice(path, 192)
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="weights_only"):
        default_voice(path, 192)
