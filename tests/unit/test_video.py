"""Video in: each family's frame rule (against the release's formula), decoding a real MP4 with
PyAV, clear errors for what cannot be a clip, and the frames' place in the prompt."""

import numpy as np
import pytest

from omni_export.errors import VideoInputError
from omni_export.runtime_py.video import VideoConfig, fps_frames, read_frames, segment_frames

SEGMENTS = VideoConfig("segments", frames=8)
ONE_FPS = VideoConfig("fps", fps=1.0, min_frames=4, max_frames=16, fit="center_crop")


def test_segment_middles_as_internvl_picks_them():
    # InternVL's get_index over frames 0..n-1: seg = (n-1)/N, int(seg/2 + round(seg*k))
    assert segment_frames(100, 25.0, SEGMENTS) == [6, 18, 31, 43, 56, 68, 80, 93]  # numpy rounds 49.5 to 50
    assert segment_frames(8, 25.0, SEGMENTS) == [0, 1, 2, 3, 4, 4, 5, 6]


def test_one_frame_a_second_within_4_to_16_as_vita_picks_them():
    assert fps_frames(300, 30.0, ONE_FPS) == list(range(0, 300, 30))  # 10 s: every 30th frame
    long = fps_frames(1800, 30.0, ONE_FPS)  # 60 s: 60 candidates spread over 16
    assert len(long) == 16 and long[0] == 0 and long[-1] == 1770
    assert fps_frames(50, 25.0, ONE_FPS) == [0, 0, 0, 25]  # 2 s: two candidates repeated up to 4


def test_decoded_frames_are_the_picked_ones_in_order(clip):
    frames = read_frames(clip, SEGMENTS)
    which = [round(float(np.asarray(f).mean()) / 8) for f in frames]  # frame k is grey 8k (give or take the codec)
    assert which == segment_frames(30, 10.0, SEGMENTS)
    assert frames[0].size == (160, 120)  # InternVL squashes to the tile later
    cropped = read_frames(clip, ONE_FPS)
    assert len(cropped) == 4 and cropped[0].size == (120, 120)  # CLIP's centre square
    assert [round(float(np.asarray(f).mean()) / 8) for f in cropped] == [0, 0, 10, 20]  # 3 s at 1 fps: 0, 0, 1 s, 2 s


def test_what_cannot_be_a_clip_is_a_clear_error(tmp_path):
    with pytest.raises(VideoInputError, match="does not exist"):
        read_frames(tmp_path / "none.mp4", SEGMENTS)
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(VideoInputError, match="cannot open video"):
        read_frames(junk, SEGMENTS)
    import soundfile as sf

    sound = tmp_path / "sound.wav"
    sf.write(sound, np.zeros(1600, dtype=np.float32), 16000)
    with pytest.raises(VideoInputError, match="no video stream"):
        read_frames(sound, SEGMENTS)


@pytest.mark.parametrize("family", ["interactiveomni", "vita15"])
def test_a_clip_enters_the_prompt_as_its_release_prompts_it(tiny, clip, family):
    """InteractiveOmni: 8 frames, each "FrameN: <img>...</img>"; VITA-1.5: 1 fps (4 frames for
    3 s), the frames' placeholders back to back in one run. Then the turn is answered."""
    from omni_export.api import eager_pipeline
    from omni_export.runtime_py.pipeline import collect

    p = eager_pipeline(tiny[family], max_context=1024)
    per_tile = p.config["image"]["tokens_per_tile"]
    frames = 8 if family == "interactiveomni" else 4
    assert p.add_video(clip) == frames * per_tile
    p.add_text("What happens in the clip?")
    ids, image, _ = p._prompt_ids(fresh=True)
    assert image.shape[0] == frames * per_tile
    text = p.tokenizer.decode(ids, skip_special_tokens=False)
    token = p.config["prompt"]["image_token"]
    if family == "interactiveomni":
        for i in range(1, frames + 1):
            assert f"Frame{i}: <img>{token * per_tile}</img>\n" in text
        assert "Frame9" not in text
    else:
        assert token * (frames * per_tile) + "\n" in text and "Frame" not in text
    reply = collect(p.respond_stream(4, speech=False), p.config["output_sample_rate"])
    assert len(reply.token_ids) == 4 and reply.prompt_tokens == len(ids)


def test_a_pipeline_without_a_video_config_says_so(tiny, clip):
    from omni_export.api import eager_pipeline

    p = eager_pipeline(tiny["vita15"], max_context=256)
    del p.config["video"]
    with pytest.raises(VideoInputError, match="takes no video"):
        p.add_video(clip)
