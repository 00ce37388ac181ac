"""PixArt-Σ's resolution binning, as diffusers does it (`PixArtImageProcessor.classify_height_width_bin` and
`resize_and_crop_tensor`), in numpy: a size that is not one of the model's aspect-ratio buckets is generated at the
bucket whose height / width ratio is nearest, and the decoded image is resized (bilinear, as torch's
`F.interpolate(align_corners=False)`) to cover the size asked for and cropped to it around the centre.

A package records the model's bucket table (`resolution_bins` in the manifest, written by the exporter from
diffusers' `ASPECT_RATIO_*_BIN` for the transformer's sample size); `generate --size` bins a size the package has
no graphs for, and the bucket must be one of the package's sizes.
"""

from __future__ import annotations

import numpy as np


def classify(height: int, width: int, bins: dict[str, list]) -> tuple[int, int]:
    """The bucket (height, width) whose ratio key is nearest to height / width (the first such key on a tie)."""
    ratio = float(height / width)
    closest = min(bins, key=lambda key: abs(float(key) - ratio))
    return int(bins[closest][0]), int(bins[closest][1])


def _source_index(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear source positions (align_corners=False, no antialias): lower index, upper index, weight."""
    scale = np.float32(in_size / out_size)
    src = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5), 0)
    low = src.astype(np.int64)  # floor: src >= 0
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (src - low).astype(np.float32)


def resize_bilinear(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, C, H, W) float32 -> (N, C, height, width), as `F.interpolate(mode="bilinear", align_corners=False)`."""
    y0, y1, wy = _source_index(height, images.shape[2])
    x0, x1, wx = _source_index(width, images.shape[3])
    rows = images[:, :, y0, :] * (1 - wy)[:, None] + images[:, :, y1, :] * wy[:, None]
    return (rows[:, :, :, x0] * (1 - wx) + rows[:, :, :, x1] * wx).astype(np.float32)


def resize_and_crop(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """diffusers' `resize_and_crop_tensor`: scale (N, C, H, W) to cover height x width, then crop the centre."""
    h, w = images.shape[2:]
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    resized_h, resized_w = int(h * ratio), int(w * ratio)
    images = resize_bilinear(images, resized_h, resized_w)
    top, left = (resized_h - height) // 2, (resized_w - width) // 2
    return images[:, :, top : top + height, left : left + width]
