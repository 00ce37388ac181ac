"""Generate an image from a prompt with an artifact package, on ONNX Runtime (no torch needed).

PKG is a package folder written by `edit-mobile export`. Its manifest fixes the image sizes (one static graph per
size: --size picks one), the model family (PixArt-Σ or SD3) and the static text length; every file's sha256 is
checked before use. The same package,
prompt, seed and step count give the same PNG, byte for byte, on the same machine and ONNX Runtime version.

example:
  edit-mobile generate pkg --prompt "a red fox in the snow" --steps 20 --seed 0 --out fox.png
  edit-mobile generate pkg --size 192x320 --prompt "a red circle" --out portrait.png
"""

from __future__ import annotations

from ..runtime.errors import UserError
from ..runtime.package import parse_resolution

HELP = "generate an image from a prompt with a package (ONNX Runtime, no torch)"


def build_parser(parser):
    from ..runtime.families import describe

    parser.add_argument("package", metavar="PKG", help="package folder (edit-mobile export)")
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--negative-prompt", default="", help="negative prompt (default: empty)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"classifier-free guidance scale; <= 1 disables it (default: {describe(lambda f: f.default_guidance)})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the numpy initial noise (default 0)")
    parser.add_argument(
        "--backend", default=None, help="inference backend (default: the package's; ort for ONNX packages)"
    )
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: the backend's)")
    parser.add_argument(
        "--size",
        "--resolution",
        default=None,
        metavar="WxH",
        help="image size, N or WIDTHxHEIGHT: one the package was exported for (`edit-mobile inspect` lists them; "
        "default: its first)",
    )
    parser.add_argument(
        "--memory",
        default="default",
        metavar="default|low",
        help="low: load each component when the loop first needs it and release it when done (one component's "
        "weights in memory at a time; the same image, slower for several images)",
    )
    parser.add_argument(
        "--no-cpu-arena",
        action="store_true",
        help="ONNX Runtime: no CPU memory arena (freed activation memory goes back at once; lower peak, slower)",
    )
    parser.add_argument(
        "--shared-arena",
        action="store_true",
        help="ONNX Runtime: one CPU memory arena shared by every component's session instead of one each (memory "
        "one component freed serves the next)",
    )
    parser.add_argument(
        "--mem-pattern",
        action="store_true",
        help="ONNX Runtime: pre-plan each run's activations as one block (its own default; off here: the block comes "
        "on top of what the arena already holds, up to 1.8x the peak, for no measured speed-up; docs/memory.md)",
    )
    parser.add_argument("--out", required=True, help="PNG file to write (atomically)")
    return parser


def main(args) -> int:
    from ..runtime.ort_backend import check_arena
    from ..runtime.package import load_package
    from ..runtime.pipeline import Text2ImagePipeline, save_png

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    check_arena(not args.no_cpu_arena, args.shared_arena)
    wanted = parse_resolution(args.size) if args.size is not None else None
    package = load_package(args.package)
    size, resize_to = package.generation_size(wanted)  # PixArt-Σ: a size between buckets is binned, as diffusers
    package = package.at_size(size)
    pipe = Text2ImagePipeline(
        package,
        backend=args.backend,
        threads=args.threads,
        memory=args.memory,
        cpu_arena=not args.no_cpu_arena,
        shared_arena=args.shared_arena,
        mem_pattern=args.mem_pattern,
    )
    result = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        output_size=resize_to,
    )
    out = save_png(result.image, args.out)
    print(f"wrote {out}")
    return 0
