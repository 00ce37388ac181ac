"""Tiled VAE: a component whose graph is exported at a tile size runs on full-size inputs tile by tile, and the
overlapping tiles are blended (manifest `components.<name>.tiling`; `export --vae-tile PX`).

A 4096² image through a full-size decoder graph needs tens of GB of activations; through a 512² tile graph it needs
what one tile needs. As diffusers' `AutoencoderKL.enable_tiling`, neighbouring tiles overlap and are blended
linearly across the overlap, so that no seam shows. Two differences, both because the graph's shapes are static:
every tile is whole (the last one in a row or column ends at the edge instead of being cut short), and the blend
is a normalised weighted average (each tile's weight ramps up across its overlap with the tile before it and down
across its overlap with the tile after it), which is diffusers' linear blend where two tiles meet and stays a
proper average where the edge-aligned last tile overlaps more. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .io_specs import TensorSpec, as_specs, check_inputs


@dataclass(frozen=True)
class Tiling:
    """`components.<name>.tiling`: the graph's input tile (height, width), the overlap of neighbouring tiles, and
    the alignment of tile starts (all in the component input's units: latents for the decoder, pixels for the
    encoder, whose tiles start on whole latents)."""

    tile: tuple[int, int]
    overlap: int
    align: int = 1

    def to_dict(self) -> dict:
        return {"tile": list(self.tile), "overlap": self.overlap, "align": self.align}


def tile_starts(length: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Starts of the fewest whole tiles that cover [0, length) with neighbours sharing at least `overlap`, spread
    evenly, each a multiple of `align`; the last ends at the edge."""
    if tile >= length:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    last = length - tile
    return sorted({min(align * round(i * last / (count - 1) / align), last) for i in range(count)})


def _ramp(starts: list[int], k: int, size: int, scale: float) -> np.ndarray:
    """Tile k's 1-D blend weight over its `size` output pixels: rising across the overlap with tile k-1, falling
    across the overlap with tile k+1 (positions scaled from input to output units by `scale`)."""
    start = starts[k] * scale
    x = start + np.arange(size) + 0.5
    w = np.ones(size)
    before = starts[k - 1] * scale + size - start if k > 0 else 0  # the overlaps (<= 0: the tiles only touch)
    after = start + size - starts[k + 1] * scale if k + 1 < len(starts) else 0
    if before > 0:
        w = np.minimum(w, (x - start) / before)
    if after > 0:
        w = np.minimum(w, (start + size - x) / after)
    return w


def _grid(x: np.ndarray, tiling: Tiling) -> tuple[list[int], list[int]]:
    """The tiles' row and column starts over `x`'s last two axes."""
    (th, tw), (h, w) = tiling.tile, x.shape[-2:]
    return tile_starts(h, th, tiling.overlap, tiling.align), tile_starts(w, tw, tiling.overlap, tiling.align)


def run_tiled(run, x: np.ndarray, tiling: Tiling) -> np.ndarray:
    """`run` (one tile (N, C, th, tw) -> (N, C', th*s, tw*s)) over every tile of `x` (N, C, H, W), blended into the
    full output (N, C', H*s, W*s); s, the output / input size ratio, is read from the first tile."""
    (th, tw), (h, w) = tiling.tile, x.shape[-2:]
    rows, cols = _grid(x, tiling)
    out = norm = None
    for i, y in enumerate(rows):
        for j, x0 in enumerate(cols):
            piece = run(np.ascontiguousarray(x[..., y : y + th, x0 : x0 + tw]))
            oh, ow = piece.shape[-2:]
            scale = oh / th
            if out is None:  # float32 sums: a 4096² image's float64 ones would add 0.3 GB to the decoding peak
                out = np.zeros((*piece.shape[:-2], round(h * scale), round(w * scale)), np.float32)
                norm = np.zeros(out.shape[-2:], np.float32)
            weight = np.outer(_ramp(rows, i, oh, scale), _ramp(cols, j, ow, scale)).astype(np.float32)
            oy, ox = round(y * scale), round(x0 * scale)
            out[..., oy : oy + oh, ox : ox + ow] += piece * weight
            norm[oy : oy + oh, ox : ox + ow] += weight
    out /= norm
    return out.astype(piece.dtype, copy=False)


def tiles(x: np.ndarray, tiling: Tiling) -> list[np.ndarray]:
    """Every tile `run_tiled` cuts from `x`, row by row (what a tiled graph is calibrated and checked on)."""
    th, tw = tiling.tile
    rows, cols = _grid(x, tiling)
    return [np.ascontiguousarray(x[..., y : y + th, x0 : x0 + tw]) for y in rows for x0 in cols]


def tile_spec(spec: TensorSpec, tiling: Tiling) -> TensorSpec:
    """The graph's input spec: the component's full-size input with the tile's height and width."""
    return TensorSpec(spec.name, (*spec.shape[:-2], *tiling.tile), spec.dtype)


class TiledBackend:
    """A tiled component: full-size inputs and outputs, the backend of its tile-size graph run tile by tile."""

    def __init__(self, backend, tiling: Tiling, input_specs, output_names: list[str]):
        self.backend, self.tiling = backend, tiling
        self.input_specs, self.output_names = as_specs(input_specs), list(output_names)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(inputs, self.input_specs, where="tiled component")
        (name,), (out,) = [s.name for s in self.input_specs], self.output_names
        return {out: run_tiled(lambda tile: self.backend.run({name: tile})[out], inputs[name], self.tiling)}
