"""Video in: a clip decoded with PyAV (FFmpeg in its wheel), frames chosen as each family's
release chooses them, each frame fitted to one vision tile.

- ``segments`` (InteractiveOmni, after InternVL's ``load_video``): the middle frame of each of N
  equal segments of the clip (N = 8, InteractiveOmni's README default).
- ``fps`` (VITA-1.5, its ``_get_rawvideo_dec``): one frame per second (every round(fps)-th frame);
  more than ``max_frames`` (16) or fewer than ``min_frames`` (4) are re-spread evenly over those,
  so a short clip repeats frames."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from omni_export.configs import from_dict
from omni_export.errors import VideoInputError
from omni_export.registry import Registry


@dataclass(frozen=True)
class VideoConfig:
    """How a family takes a clip (the bundle's ``video`` runtime config)."""

    sampling: str  # a FRAME_RULES name
    frames: int = 8  # segments
    fps: float = 1.0  # fps
    min_frames: int = 4
    max_frames: int = 16
    fit: str = "resize"  # to the square tile: "resize" (InternVL) or "center_crop" (CLIP's, VITA's)
    frame_label: str = ""  # text before each frame's placeholders, "{i}" = its 1-based number
    joined: bool = False  # all frames in one placeholder run (VITA) or one run per frame


FRAME_RULES: Registry = Registry("video frame rule")


@FRAME_RULES.decorator("segments")
def segment_frames(n: int, fps: float, cfg: VideoConfig) -> list[int]:
    seg = (n - 1) / cfg.frames
    return [int(seg / 2 + np.round(seg * k)) for k in range(cfg.frames)]


@FRAME_RULES.decorator("fps")
def fps_frames(n: int, fps: float, cfg: VideoConfig) -> list[int]:
    every = max(1, round(fps / cfg.fps))
    picked = list(range(0, n, every))
    want = cfg.max_frames if len(picked) > cfg.max_frames else cfg.min_frames if len(picked) < cfg.min_frames else 0
    if want:
        picked = [picked[i] for i in np.linspace(0, len(picked) - 1, num=want, dtype=int)]
    return picked


def video_config(raw: dict) -> VideoConfig:
    return from_dict(VideoConfig, raw, where="video")


def _open(path: Path):  # type: ignore[no-untyped-def]
    import av

    if not path.is_file():
        raise VideoInputError(f"video file {path} does not exist")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise VideoInputError(f"cannot open video {path}: {exc}. Give an MP4, MKV, WebM or MOV clip.") from None
    if not container.streams.video:
        container.close()
        raise VideoInputError(f"{path} has no video stream")
    return container


def read_frames(path: str | os.PathLike, cfg: VideoConfig) -> list:  # -> list[PIL.Image.Image]
    """The frames ``cfg``'s rule picks, as RGB images, in order (a repeated pick repeats the frame)."""
    import av

    path = Path(path)
    container = _open(path)
    try:
        stream = container.streams.video[0]
        # Counted from the packets: the header's frame count is missing or wrong in many files.
        n = sum(1 for p in container.demux(stream) if p.size)
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        if n == 0:
            raise VideoInputError(f"{path} holds no frames")
        picks = FRAME_RULES.get(cfg.sampling)(n, fps, cfg)
        container.seek(0)
        wanted, frames = set(picks), {}
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                frames[i] = frame.to_image()
            if len(frames) == len(wanted):
                break
    except av.FFmpegError as exc:
        raise VideoInputError(f"cannot decode video {path}: {exc}") from None
    finally:
        container.close()
    missing = sorted(wanted - set(frames))
    if missing:  # fewer decodable frames than packets: use the last one that decoded
        if not frames:
            raise VideoInputError(f"{path}: no frame could be decoded")
        last = frames[max(frames)]
        frames.update({i: last for i in missing})
    return [fit_frame(frames[i], cfg.fit) for i in picks]


def fit_frame(image, how: str):  # type: ignore[no-untyped-def]
    """One square tile's worth: squashed (InternVL) or the centre square (CLIP's processor); the
    tile size itself is the vision encoder's, applied by the image preprocessing."""
    if how == "resize":
        return image
    if how != "center_crop":
        raise VideoInputError(f"unknown frame fit {how!r}; the bundle's video config is damaged, rebuild it")
    side = min(image.width, image.height)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))
