"""Convert a PixArt-Σ (--arch edit) or SD3 / SD3.5 (--arch mm-edit) pipeline to EDiT / MM-EDiT.

SRC is a preset (tiny-pixart, tiny-sd3, pixart-sigma-xl, sd35-medium) or a local diffusers pipeline folder.
Every teacher weight is copied; the new ConvFusion / Spatial Compressor layers start so that the converted
model is close to its teacher (distill it afterwards with `edit-mobile distill`). The output is a diffusers
pipeline folder (safetensors) that the stock pipeline class loads after `import edit_mobile.models`.

example:
  edit-mobile convert tiny-pixart --arch edit --out tiny-edit
"""

from __future__ import annotations

HELP = "convert a PixArt-Σ / SD3 pipeline (preset or folder) to EDiT / MM-EDiT"


def build_parser(parser):
    from ..runtime.families import FAMILIES

    parser.add_argument("src", metavar="SRC", help="preset name or local diffusers pipeline folder")
    parser.add_argument(
        "--arch",
        required=True,
        choices=[f.convert_arch for f in FAMILIES.values()],
        help="; ".join(f"{f.convert_arch}: {f.title} -> {f.student_title}" for f in FAMILIES.values()),
    )
    parser.add_argument("--out", required=True, help="output pipeline folder (written atomically)")
    parser.add_argument("--convfusion-reduction", type=int, default=4, help="ConvFusion channel reduction r")
    parser.add_argument(
        "--convfusion",
        choices=["dense", "separable", "off"],
        default="dense",
        help="ConvFusion's 3x3 conv: dense C -> C/r (the paper's), depthwise-separable, or no ConvFusion",
    )
    parser.add_argument("--kv-stride", type=int, default=2, help="Spatial Compressor stride (M ~ N / stride^2)")
    parser.add_argument(
        "--eta-mode",
        choices=["token_count", "exact"],
        default="token_count",
        help="MM-EDiT mixing weight: token-count approximation (linear) or exact (quadratic)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return parser


def main(args) -> int:
    from ..models.convert import convert
    from ..models.edit_attention import EDiTConfig

    edit = EDiTConfig(
        convfusion_reduction=args.convfusion_reduction,
        convfusion=args.convfusion,
        kv_stride=args.kv_stride,
        eta_mode=args.eta_mode,
    )
    out = convert(args.src, args.arch, args.out, edit, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
