"""EDiT vs softmax self-attention on CPU (PyTorch eager, fp32, batch 1): measured time and theoretical cost.

Two levels, PixArt-Σ-XL width (the `pixart-sigma-xl` preset's transformer: 1152 channels, 16 heads of 72), latent
grids of 512², 1024² and 2048² images (8x VAE, patch 2: 32x32, 64x64, 128x128 tokens):
  layer        one diffusers `Attention`: stock SDPA processor (the softmax teacher) vs the same module with
               `add_edit_layers` + `EDiTAttnProcessor` (same weights);
  transformer  a `PixArtTransformer2DModel` at XL width with reduced depth (--depth, default 2) vs
               `EDiTPixArtTransformer2DModel.from_teacher` of it, on realistic inputs: a 4x(H/8)x(W/8) latent,
               300 prompt tokens x 4096 caption channels (through caption_projection, with the pipeline's mask),
               a timestep.
Both sides run interleaved in the same process (the order alternates per repeat); the medians are reported.
One JSON row per (level, resolution) is printed as soon as it is measured; --json writes them all as a list.

    python scripts/bench_attention.py --threads 2 --repeats 5 --json bench_attention.json
    python scripts/bench_attention.py --quick        # layer only, 512² and 1024², a few repeats (< 1 minute)
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from studies import archs

from edit_mobile.models.edit_attention import EDiTAttnProcessor, EDiTConfig, add_edit_layers
from edit_mobile.models.edit_pixart import EDiTPixArtTransformer2DModel

PRESET = "pixart-sigma-xl"  # PixArt-Σ-XL-2: its transformer's width, heads, channels and patch come from the preset
PROMPT_TOKENS = 300  # T5 prompt tokens PixArt-Σ's pipeline encodes
RESOLUTIONS = (512, 1024, 2048)


@dataclass(frozen=True)
class Arch:
    """The sizes of the preset's transformer that the cost model and the inputs need."""

    dim: int
    heads: int
    head_dim: int
    caption_channels: int
    latent_channels: int
    out_channels: int
    patch: int
    vae_factor: int


@functools.cache
def xl() -> Arch:
    c = archs.transformer_config(PRESET)
    return Arch(
        dim=c["num_attention_heads"] * c["attention_head_dim"],
        heads=c["num_attention_heads"],
        head_dim=c["attention_head_dim"],
        caption_channels=c["caption_channels"],
        latent_channels=c["in_channels"],
        out_channels=c["out_channels"],
        patch=c["patch_size"],
        vae_factor=archs.vae_scale_factor(PRESET),
    )


# --- Theoretical cost: multiply-adds (MACs) of every matmul / convolution, counted analytically -----------------
# Notation: N = h*w image tokens, M = ceil(h/s)*ceil(w/s) compressed tokens, C channels, d = C/H head size,
# r ConvFusion reduction, L prompt tokens. Biases, norms, activations and softmax exponentials are not counted.
#
# softmax self-attention:  4 N C^2            (W_q, W_k, W_v, W_o on N tokens)
#                        + 2 N^2 C            (Q K^T and A V: N x N per head, summed over heads: H N^2 d = N^2 C)
# EDiT self-attention:     4 N C^2            (the same projections; K/V are projected before compression)
#                        + 9 N C (C/r)        (ConvFusion 3x3 conv C -> C/r)
#                        + N (C/r) C          (ConvFusion 1x1 conv C/r -> C)
#                        + 2 * 9 M C          (depthwise 3x3 stride-s convs on K and V)
#                        + M C (d+1)          ([S | z] = K^T [V | 1] per head: H M d (d+1))
#                        + N C (d+1)          (Q [S | z] per head: numerator and denominator together)
# The rest of a PixArt transformer (identical on both sides) is in `transformer_macs`.


def compressed_tokens(grid: tuple[int, int], stride: int) -> int:
    return -(-grid[0] // stride) * -(-grid[1] // stride)  # ceil(h/s) * ceil(w/s), padding 1, kernel 3


def softmax_attention_macs(n: int, dim: int) -> int:
    return 4 * n * dim * dim + 2 * n * n * dim


def edit_attention_macs(
    grid: tuple[int, int],
    dim: int,
    heads: int,
    config: EDiTConfig = EDiTConfig(),  # noqa: B008 (frozen dataclass: immutable)
) -> int:
    n, m, d = grid[0] * grid[1], compressed_tokens(grid, config.kv_stride), dim // heads
    hidden = max(dim // config.convfusion_reduction, 1)
    return (
        4 * n * dim * dim
        + 9 * n * dim * hidden
        + n * hidden * dim
        + 2 * 9 * m * dim
        + m * dim * (d + 1)
        + n * dim * (d + 1)
    )


def transformer_macs(grid: tuple[int, int], depth: int, self_attention_macs: int, a: Arch) -> int:
    """Whole PixArt forward, batch 1: everything outside the self-attention is the same for teacher and EDiT."""
    n, L, dim = grid[0] * grid[1], PROMPT_TOKENS, a.dim
    embed = n * a.latent_channels * a.patch * a.patch * dim  # patch embedding (2x2 stride-2 conv)
    caption = L * (a.caption_channels * dim + dim * dim)  # caption_projection: two linears
    timestep = 256 * dim + dim * dim + dim * 6 * dim  # timestep MLP + adaLN-single's 6C modulation
    cross = 2 * n * dim * dim + 2 * L * dim * dim + 2 * n * L * dim  # W_q, W_o on N; W_k, W_v on L; QK^T, AV
    mlp = 2 * n * dim * 4 * dim  # GELU MLP C -> 4C -> C
    final = n * dim * a.patch * a.patch * a.out_channels  # proj_out
    return embed + caption + timestep + depth * (self_attention_macs + cross + mlp) + final


# --- Timing ---------------------------------------------------------------------------------------------------


def time_pair(softmax_fn, edit_fn, repeats: int) -> tuple[list[float], list[float]]:
    """Milliseconds per call of both sides, interleaved (order alternating) after one warm-up call each."""
    times = {"softmax": [], "edit": []}
    fns = [("softmax", softmax_fn), ("edit", edit_fn)]
    with torch.inference_mode():
        for _, fn in fns:
            fn()
        for i in range(repeats):
            for name, fn in fns if i % 2 == 0 else fns[::-1]:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times["softmax"], times["edit"]


def row(
    level: str,
    resolution: int,
    grid: tuple[int, int],
    softmax_ms: list[float],
    edit_ms: list[float],
    softmax_macs: int,
    edit_macs: int,
    threads: int,
    **extra,
) -> dict:
    soft, edit = statistics.median(softmax_ms), statistics.median(edit_ms)
    return {
        "level": level,
        "resolution": resolution,
        "grid": list(grid),
        "tokens": grid[0] * grid[1],
        **extra,
        "softmax_ms": round(soft, 1),
        "edit_ms": round(edit, 1),
        "speedup": round(soft / edit, 2),
        "flop_ratio": round(softmax_macs / edit_macs, 2),
        "softmax_gmacs": round(softmax_macs / 1e9, 2),
        "edit_gmacs": round(edit_macs / 1e9, 2),
        "softmax_ms_min": round(min(softmax_ms), 1),
        "edit_ms_min": round(min(edit_ms), 1),
        "repeats": len(edit_ms),
        "threads": threads,
        "dtype": "float32",
        "batch": 1,
        "device": "cpu",
        "torch": torch.__version__,
    }


def latent_grid(resolution: int) -> tuple[int, int]:
    side = resolution // xl().vae_factor // xl().patch
    return side, side


def bench_layer(resolution: int, repeats: int, threads: int, config: EDiTConfig) -> dict:
    grid, a = latent_grid(resolution), xl()
    torch.manual_seed(0)
    # The self-attention of a PixArt block (attn1), with diffusers' stock SDPA processor: the softmax teacher.
    teacher = Attention(query_dim=a.dim, heads=a.heads, dim_head=a.head_dim, bias=True, out_bias=True).eval()
    teacher.set_processor(AttnProcessor2_0())
    student = copy.deepcopy(teacher)  # same W_q / W_k / W_v / W_o
    add_edit_layers(student, config)
    student.set_processor(EDiTAttnProcessor(config))
    x = torch.randn(1, grid[0] * grid[1], a.dim)
    soft, edit = time_pair(lambda: teacher(x), lambda: student(x, grid_size=grid), repeats)
    return row(
        "layer",
        resolution,
        grid,
        soft,
        edit,
        softmax_attention_macs(grid[0] * grid[1], a.dim),
        edit_attention_macs(grid, a.dim, a.heads, config),
        threads,
        depth=1,
    )


def bench_transformer(resolution: int, repeats: int, threads: int, config: EDiTConfig, depth: int) -> dict:
    grid, a = latent_grid(resolution), xl()
    latent = resolution // a.vae_factor
    teacher = archs.teacher(PRESET, num_layers=depth, sample_size=latent)  # seed 0
    student = EDiTPixArtTransformer2DModel.from_teacher(teacher, config).eval()
    inputs = dict(
        hidden_states=torch.randn(1, a.latent_channels, latent, latent),
        encoder_hidden_states=torch.randn(1, PROMPT_TOKENS, a.caption_channels),
        encoder_attention_mask=torch.ones(1, PROMPT_TOKENS),  # the pipeline always passes the prompt mask
        timestep=torch.tensor([999]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
    soft, edit = time_pair(lambda: teacher(**inputs), lambda: student(**inputs), repeats)
    n = grid[0] * grid[1]
    return row(
        "transformer",
        resolution,
        grid,
        soft,
        edit,
        transformer_macs(grid, depth, softmax_attention_macs(n, a.dim), a),
        transformer_macs(grid, depth, edit_attention_macs(grid, a.dim, a.heads, config), a),
        threads,
        depth=depth,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="layer only, 512 and 1024, 3 repeats (a smoke run: < 1 minute on 2 cores)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per side after a warm-up (default 5)")
    p.add_argument("--levels", nargs="+", choices=("layer", "transformer"), default=("layer", "transformer"))
    p.add_argument(
        "--resolutions", nargs="+", type=int, default=RESOLUTIONS, help="image sizes (default 512 1024 2048)"
    )
    p.add_argument("--depth", type=int, default=2, help="transformer blocks at the transformer level (default 2)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this file as a JSON list")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    levels, resolutions, repeats = args.levels, args.resolutions, args.repeats or 5
    if args.quick:
        levels, resolutions, repeats = ("layer",), (512, 1024), args.repeats or 3
    torch.set_num_threads(args.threads)
    config = EDiTConfig()
    rows = []
    for level in levels:
        for resolution in resolutions:
            if level == "layer":
                r = bench_layer(resolution, repeats, args.threads, config)
            else:
                r = bench_transformer(resolution, repeats, args.threads, config, args.depth)
            print(json.dumps(r), flush=True)
            rows.append(r)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
