"""VITA-1.5's TiCodec decoder: the released tensor names and shapes, the checkpoint as the release
stores it (one state dict per module, its training encoder beside them) and the release's
model.json."""

import json
import shutil

import pytest
import torch

from omni_export.errors import CheckpointError, ConfigError
from omni_export.export.checkpoint import load_checkpoint
from omni_export.export.components.codec import CodecConfig
from omni_export.export.synthetic import written_layout


def _released_codec_names() -> dict[str, tuple[int, ...]]:
    """VITA-1.5's vita_tts_ckpt/codec/final.pt (generator and quantizer; model.json: upsample
    8/5/5/3 with kernels 16/11/11/5 from 512 channels, ResBlock1 kernels 3/7/11 with dilations
    1/3/5, one 1024 x 512 code book, eight 1024 x 16 global books), written out from the release's
    ticodec/models.py, not from our module; weight norm in the older hook's names."""
    t: dict[str, tuple[int, ...]] = {}

    def wn(name, shape, bias):
        t[f"generator.{name}.weight_g"] = (shape[0],) + (1,) * (len(shape) - 1)
        t[f"generator.{name}.weight_v"] = shape
        t[f"generator.{name}.bias"] = (bias,)

    wn("conv_pre", (512, 512, 7), 512)
    for i, (cin, k) in enumerate([(512, 16), (256, 11), (128, 11), (64, 5)]):
        wn(f"ups.{i}", (cin, cin // 2, k), cin // 2)
        for j, rk in enumerate([3, 7, 11]):
            for n in range(3):
                wn(f"resblocks.{3 * i + j}.convs1.{n}", (cin // 2, cin // 2, rk), cin // 2)
                wn(f"resblocks.{3 * i + j}.convs2.{n}", (cin // 2, cin // 2, rk), cin // 2)
    wn("conv_post", (1, 32, 7), 1)
    t["quantizer.quantizer_modules.0.embedding.weight"] = (1024, 512)
    for j in range(8):
        t[f"quantizer.quantizer_modules_globaltokens.{j}.embedding.weight"] = (1024, 16)
    return t


def test_synthetic_writer_and_loader_use_the_released_codec_names():
    written = written_layout("vita15", "codec_decoder")
    released = _released_codec_names()
    assert sorted(set(written) ^ set(released)) == []
    assert written == released


def test_the_released_file_loads_with_its_training_encoder_and_so_does_a_flat_one(tiny_dirs, tmp_path):
    """TiCodec's final.pt is {"generator": ..., "quantizer": ..., "encoder": ...}: the encoder is
    not read and not refused; the same tensors as one flat dict load the same; anything else in
    the file is refused by name."""
    root = tmp_path / "v"
    shutil.copytree(tiny_dirs["vita15"], root)
    pt = root / "vita_tts_ckpt" / "codec" / "final.pt"
    nested = torch.load(pt, weights_only=True)
    assert sorted(nested) == ["generator", "quantizer"]
    # cloned: the loader memory-maps the file, which this test then rewrites
    want = {k: v.clone() for k, v in load_checkpoint(root, components={"codec_decoder"}).components["codec_decoder"].state_dict().items()}
    torch.save({**nested, "encoder": {"conv_pre.weight_v": torch.zeros(4, 1, 7)}}, pt)
    got = {k: v.clone() for k, v in load_checkpoint(root, components={"codec_decoder"}).components["codec_decoder"].state_dict().items()}
    assert all(torch.equal(want[k], got[k]) for k in want)
    torch.save({f"{g}.{k}": v for g, d in nested.items() for k, v in d.items()}, pt)
    got = load_checkpoint(root, components={"codec_decoder"}).components["codec_decoder"].state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    torch.save({**nested, "discriminator": {"w": torch.zeros(1)}}, pt)
    with pytest.raises(CheckpointError, match="unexpected tensor.*discriminator.w"):
        load_checkpoint(root, components={"codec_decoder"})


def test_the_releases_model_json_reads_and_a_mismatched_voice_width_is_refused():
    released = {"resblock": "1", "upsample_rates": [8, 5, 5, 3], "upsample_kernel_sizes": [16, 11, 11, 5],
                "upsample_initial_channel": 512, "resblock_kernel_sizes": [3, 7, 11],
                "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "n_codes": 1024, "n_code_groups": 1,
                "residul_layer": 1, "global_code_num": 8, "global_feature_conv": [128, 64, 128, 3, 1],
                "global_tokens": [473, 975, 419, 219, 565, 121, 550, 616], "num_mels": 80, "hop_size": 240,
                "learning_rate": 0.0002}  # fmt: skip
    cfg = CodecConfig.from_released(json.loads(json.dumps(released)), "model.json")
    assert cfg == CodecConfig() and cfg.hop == 600 and cfg.code_dim == 512
    with pytest.raises(ConfigError, match="matches no generator stage"):
        CodecConfig.from_released({**released, "global_feature_conv": [96, 64, 96, 3, 1]}, "model.json")
    with pytest.raises(ConfigError, match="resblock '2'"):
        CodecConfig.from_released({**released, "resblock": "2"}, "model.json")


def test_the_voice_vector_joins_after_the_stage_of_its_width():
    """The release adds the 128-d voice vector where a stage's output is 128 channels wide (after
    the second stage of 512 -> 256 -> 128 -> ...): changing the voice moves the audio, and the
    codec is x600."""
    from omni_export.export.components.codec import CodecDecoder

    torch.manual_seed(0)
    cfg = CodecConfig(upsample_initial_channel=32, resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),),
                      global_feature_conv=(8, 8, 8, 3, 1), global_tokens=tuple(range(8)), code_dim=16)  # fmt: skip
    dec = CodecDecoder(cfg).eval()
    for m in dec.modules():
        if isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight)
    codes = torch.randint(0, 1024, (1, 6))
    with torch.no_grad():
        a = dec(codes, torch.zeros(1, 8, dtype=torch.long))
        b = dec(codes, torch.ones(1, 8, dtype=torch.long))
    assert a.shape == (1, 6 * 600) and (a - b).abs().max() > 1e-4
