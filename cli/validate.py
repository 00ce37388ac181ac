"""Validate a package against the diffusers PyTorch pipeline it came from.

The same prompt, seed and initial noise go through diffusers (the reference) and through the package on
ONNX Runtime. Reported: per component (text encoders, transformer at several timesteps, VAE decoder and
encoder, each on identical inputs) PSNR, max abs error and cosine; the latents' PSNR after every step; the
final image's PSNR; and the package's own loop (tokenizers, guidance, scheduler, scaling) run with the PyTorch
components in place of the graphs. Gates fail with exit code 1: per component by precision (fp32 60 dB), the
trajectory (60 dB at every step) and the image (40 dB) of all-fp32 packages, the loop check (60 / 40 dB) for every
package (docs/validation.md). The report is written into the package's manifest.json and, with --json, to a file.

example:
  edit-mobile validate pkg --reference tiny-pixart --json report.json
"""

from __future__ import annotations

HELP = "compare a package with the diffusers PyTorch pipeline: per component, per step, image; gates fail"


def build_parser(parser):
    from ..runtime.families import describe

    parser.add_argument("package", metavar="PKG", help="package folder written by `edit-mobile export`")
    parser.add_argument("--reference", metavar="SRC", help="preset or diffusers folder (default: the package's source)")
    parser.add_argument("--prompt", default="a red circle on a white background")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--guidance", type=float, default=None, help=f"default: {describe(lambda f: f.default_guidance)}"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--min-component-psnr", type=float, default=None, help="override the per-precision gates")
    parser.add_argument("--min-image-psnr", type=float, default=None, help="override the image gate (40 dB)")
    parser.add_argument("--json", metavar="REPORT", help="write the report as JSON")
    return parser


def main(args) -> int:
    import json

    from ..export.validate import ValidationOptions, format_report, validate
    from ..runtime.errors import UserError

    if args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    opts = ValidationOptions(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        min_component_psnr=args.min_component_psnr,
        min_image_psnr=args.min_image_psnr,
    )
    report = validate(args.package, args.reference, opts, threads=args.threads)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["passed"] else 1
