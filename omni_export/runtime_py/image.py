"""Image preprocessing as InternVL does it: closest-aspect-ratio tiling up to ``max_num`` tiles plus
a thumbnail, bicubic resize, ImageNet normalisation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from omni_export.errors import ImageInputError

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def load_image(path: str | os.PathLike):  # -> PIL.Image.Image
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"image file {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageInputError(f"cannot decode image {path}: {exc}. Give a PNG or JPEG file.") from None


def closest_grid(width: int, height: int, min_num: int, max_num: int, tile: int) -> tuple[int, int]:
    """(cols, rows) whose aspect ratio is closest to the image's; ties go to the larger grid
    when the image has the pixels to fill it (InternVL's rule)."""
    ratios = sorted(
        {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if min_num <= i * j <= max_num},
        key=lambda r: r[0] * r[1],
    )
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in ratios:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def tile_image(image, tile: int = 448, max_num: int = 12, min_num: int = 1, thumbnail: bool = True) -> list:
    from PIL import Image

    cols, rows = closest_grid(image.width, image.height, min_num, max_num, tile)
    resized = image.resize((tile * cols, tile * rows), Image.BICUBIC)
    tiles = [
        resized.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile)) for r in range(rows) for c in range(cols)
    ]
    if thumbnail and len(tiles) > 1:
        tiles.append(image.resize((tile, tile), Image.BICUBIC))
    return tiles


def normalize(tiles: list) -> np.ndarray:
    """PIL tiles -> float32 [N, 3, S, S] ImageNet-normalised."""
    arr = np.stack([np.asarray(t, dtype=np.float32) / 255.0 for t in tiles])
    arr = (arr - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def preprocess_image(path_or_image, tile: int = 448, max_num: int = 12) -> np.ndarray:
    image = load_image(path_or_image) if isinstance(path_or_image, (str, os.PathLike)) else path_or_image
    return normalize(tile_image(image, tile, max_num))
