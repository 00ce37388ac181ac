"""Prompt accuracy of a shapes model: one image per single-shape caption, its shape, colour, size and background read
back by the shipped shapes classifier (models/assets/shapes_classifier.onnx) and compared with the caption's.

PKG is a package folder (run on ONNX Runtime, no torch); SRC a preset or diffusers pipeline folder (run through
diffusers: needs the torch extra). Prompts are N held-out single-shape scenes (runtime/scenes.py:
evaluation_scenes) or the captions of --prompt-file (one per line, 'a SIZE COLOUR SHAPE on a COLOUR background').
Prompt i uses seed S + i, and a package and its source start from the same initial latents. Reported: accuracy per
attribute and with every attribute right, the classifier on real renders of the same scenes (its error floor), and
the Fréchet distance between the classifier features of the generated images and of those renders.

example:
  edit-mobile evaluate pkg --prompts 32 --steps 20 --json eval.json --grid eval.png
"""

from __future__ import annotations

HELP = "prompt accuracy of a shapes model (attribute classifier) and a Fréchet distance to real renders"


def build_parser(parser):
    parser.add_argument("target", metavar="PKG|SRC", help="package folder, preset or diffusers pipeline folder")
    parser.add_argument(
        "--prompts", type=int, default=None, help="number of prompts (default 16; with --prompt-file: the first N)"
    )
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed S + i; also picks the scenes")
    parser.add_argument("--prompt-file", metavar="F", default=None, help="captions, one per line")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--guidance", type=float, default=None, help="default: 4.5 PixArt-Σ, 7.0 SD3")
    parser.add_argument(
        "--resolution", type=int, default=None, help="diffusers only: image side (default: the model's)"
    )
    parser.add_argument("--classifier", default=None, help="classifier .onnx (default: the shipped one)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", metavar="OUT", default=None, help="write the full report as JSON (atomically)")
    parser.add_argument("--grid", metavar="PNG", default=None, help="write the images with captions as a PNG grid")
    return parser


def _check_parent(path: str, flag: str) -> None:
    from pathlib import Path

    from ..runtime.errors import UserError

    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise UserError(f"cannot write {flag} {path}: folder {parent} does not exist")


def main(args) -> int:
    from ..runtime.errors import UserError
    from ..runtime.evaluate import evaluate_with_images, format_report, image_grid, write_json_atomic
    from ..runtime.pipeline import save_png

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    for path, flag in ((args.json, "--json"), (args.grid, "--grid")):
        if path:
            _check_parent(path, flag)  # before minutes of generation
    report, images = evaluate_with_images(
        args.target,
        prompts=args.prompts,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        prompt_file=args.prompt_file,
        resolution=args.resolution,
        classifier=args.classifier,
        threads=args.threads,
        progress=False,
    )
    print(format_report(report))
    if args.json:
        print(f"wrote {write_json_atomic(report, args.json)}")
    if args.grid:
        print(f"wrote {save_png(image_grid(images, report), args.grid)}")
    return 0
