"""The main job, with nothing downloaded: export the shipped EDiT student of the shapes model (a PixArt-Σ trained on
procedural scenes, then converted and distilled; docs/shapes.md) to an ONNX package, generate a grid of prompts with
the numpy + ONNX Runtime runtime, validate the package against the diffusers PyTorch pipeline, and measure its
prompt accuracy with the shipped attribute classifier.

DIR receives: package/ (the ONNX package), grid.png (8 prompts, captions under each image, a red frame where the
classifier disagrees with the caption), evaluation.json (the `edit-mobile evaluate` report) and validation.json
(the `edit-mobile validate` report). DIR is replaced if it exists.

example:
  edit-mobile demo --out demo
"""

from __future__ import annotations

HELP = "export the shipped shapes EDiT model, draw a prompt grid, validate it and measure its prompt accuracy"


def build_parser(parser):
    parser.add_argument("--out", default="demo", metavar="DIR", help="output folder (default ./demo; replaced)")
    parser.add_argument(
        "--model", default="shapes-pixart-edit", metavar="SRC", help="preset or pipeline folder (default: shipped)"
    )
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts evaluated (default 16; grid: 8)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--resolution", type=int, default=64, help="image side in pixels (default 64, the native)")
    return parser


def main(args) -> int:
    from pathlib import Path

    from ..export.package import export_package
    from ..export.validate import ValidationOptions, validate
    from ..runtime.atomic import atomic_output_dir
    from ..runtime.errors import UserError
    from ..runtime.evaluate import evaluate_with_images, format_report, image_grid, write_json_atomic
    from ..runtime.pipeline import save_png
    from ..runtime.scenes import evaluation_scenes

    if args.prompts < 8:
        raise UserError(f"--prompts must be >= 8 (the grid shows 8), got {args.prompts}")
    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot write {out}: it exists and is not a folder")
    # Everything is made in a temporary sibling folder that becomes DIR at the end: no half-written demo.
    with atomic_output_dir(out, overwrite=True) as tmp:
        package = tmp / "package"
        # at the prompt length the model was trained at, when its folder records one (the shapes models: 32)
        export_package(args.model, package, target="onnx", resolution=args.resolution)
        print(f"exported {args.model} -> {out / 'package'}")
        report, images = evaluate_with_images(str(package), prompts=args.prompts, steps=args.steps)
        report["target"] = str(out / "package")  # where it will be, not the temporary folder
        print(format_report(report))
        write_json_atomic(report, tmp / "evaluation.json")
        save_png(image_grid(images[:8], report), tmp / "grid.png")
        opts = ValidationOptions(prompt=evaluation_scenes(1)[0].caption, steps=args.steps)
        validation = validate(str(package), opts=opts)
        write_json_atomic(validation, tmp / "validation.json")
        passed = validation["passed"]
        print(f"validation against PyTorch: {'passed' if passed else 'FAILED'} (report in validation.json)")
    accuracy = report["accuracy"]
    print(
        f"demo done: {out / 'grid.png'}; prompt accuracy {accuracy['all']:.0%} with every attribute right "
        f"({args.prompts} held-out prompts)"
    )
    return 0 if passed else 1
