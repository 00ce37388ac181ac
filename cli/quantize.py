"""Quantize the components of an fp32 package (fp16 / int8 / int4) into a new package.

PKG is a package written by `edit-mobile export`. The result PKG2 is a complete package: quantized components
get new files, sha256 hashes, their precision, how they were made and the PSNR gate `edit-mobile validate`
applies to them (fp16 40 dB, int8-weights 35 dB, int8-dynamic / int8-static / int4-weights 25 dB); the others,
tokenizers and scheduler are copied. Calibration inputs are real: the package's own sampling loop runs on the
calibration prompts (default: 4 prompts of the shipped list) and records every transformer input at every step,
the tokenized prompts and the final latents.

precisions:
  fp16          fp16 weights and compute, fp32 inputs / outputs; linear-attention accumulators and
                normalisation statistics stay fp32 (docs/quantization.md)
  int8-dynamic  int8 weights, activations quantized at run time (fastest on CPU)
  int8-static   int8 weights and activations (QDQ), activation ranges calibrated on the recorded inputs
  int8-weights  int8 weights (blocks of 128), fp32 compute
  int4-weights  4-bit weights (blocks of 32 with zero points), fp32 compute; --keep-8bit K gives the K most
                sensitive node groups 8 bits
  Core ML packages: int8-weights, palettize-4, palettize-6, w8a8

Mixed precisions: `--precision transformer=int8-dynamic,vae_decoder=fp16`. Default components: all for fp16,
the transformer and text encoders for int8 / int4.

example:
  edit-mobile quantize pkg --precision int8-dynamic --out pkg-int8
  edit-mobile validate pkg-int8 --reference tiny-pixart
"""

from __future__ import annotations

import contextlib
import io
import logging

from ..runtime.manifest import COREML_PRECISIONS, ONNX_PRECISIONS

HELP = "quantize a package's components (fp16, int8 dynamic / static / weight-only, int4 weights) into a new package"


def build_parser(parser):
    parser.add_argument("package", metavar="PKG", help="fp32 package folder (edit-mobile export)")
    parser.add_argument(
        "--precision",
        required=True,
        metavar="PREC",
        help=f"one of {', '.join(ONNX_PRECISIONS)} (Core ML: {', '.join(COREML_PRECISIONS)}), "
        "or COMPONENT=PREC,... for mixed precisions",
    )
    parser.add_argument("--out", required=True, metavar="PKG2", help="package folder to write (atomically)")
    parser.add_argument(
        "--components",
        default=None,
        help="comma-separated components (default: all for fp16; transformer and text encoders for int8)",
    )
    parser.add_argument(
        "--calibration-prompts",
        metavar="FILE",
        default=None,
        help="one prompt per line (default: 4 prompts of the shipped list)",
    )
    parser.add_argument(
        "--calibration-steps",
        type=int,
        default=None,
        help="sampling steps per calibration prompt; every step is recorded (default 10)",
    )
    parser.add_argument(
        "--calibration-method",
        default="minmax",
        metavar="METHOD",
        help="static int8 activation ranges: minmax (default), entropy, percentile",
    )
    parser.add_argument("--per-channel", action="store_true", help="int8: one weight scale per output channel")
    parser.add_argument(
        "--full-range-weights",
        action="store_true",
        help="int8-dynamic / int8-static: 8-bit weight ranges, for CPUs whose int8 kernels accumulate in int32 "
        "(ARM phones, x86 with VNNI): 2-5 dB more per component. Default 7-bit, which AVX2-only x86 CPUs need "
        "(their int16 pair sums saturate with full-range weights)",
    )
    parser.add_argument(
        "--sensitivity",
        action="store_true",
        help="int8: quantize one node group at a time, measure PSNR, keep the worst groups in "
        "float until the component reaches its gate + 10 dB; the excluded nodes are reported",
    )
    parser.add_argument(
        "--keep-8bit",
        type=int,
        default=0,
        metavar="K",
        help="int4-weights: measure each node group alone at 4 bits and give the K worst 8 bits "
        "(recorded in the manifest)",
    )
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PKG2 folder")
    return parser


def main(args) -> int:
    from ..runtime.errors import UserError
    from ..runtime.package import read_manifest

    manifest = read_manifest(args.package)
    if manifest.get("target") == "coreml":
        return _coreml(args)
    from ..export.calibration import DEFAULT_STEPS
    from ..export.quantize import quantize_package

    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    steps = DEFAULT_STEPS if args.calibration_steps is None else args.calibration_steps
    with _quiet_ort_quantizers():
        new = quantize_package(
            args.package,
            args.out,
            args.precision,
            components=args.components,
            calibration_prompts=args.calibration_prompts,
            calibration_steps=steps,
            calibration_method=args.calibration_method,
            per_channel=args.per_channel,
            sensitivity=args.sensitivity,
            overwrite=args.overwrite,
            threads=args.threads,
            keep_8bit=args.keep_8bit,
            full_range_weights=args.full_range_weights,
        )
    print(f"wrote {args.out}")
    print(f"{'component':<16}{'precision':<14}{'size':>8}{'PSNR vs fp32':>14}{'excluded':>10}")
    for name, prec in new["quantization"]["components"].items():
        q = new["components"][name]["quantization"]
        size = q["size_bytes"]["quantized"] / max(q["size_bytes"]["fp32"], 1)
        excluded = len(q["excluded_nodes"]) + sum(len(v) for v in q.get("fp16_blocked_nodes", {}).values())
        print(f"{name:<16}{prec:<14}{size:>7.2f}x{q['check']['psnr_db']:>11.1f} dB{excluded:>10}")
        if q.get("sensitivity"):
            print(f"  sensitivity excluded: {', '.join(q['sensitivity']['excluded_groups']) or 'nothing'}")
    return 0


@contextlib.contextmanager
def _quiet_ort_quantizers():
    """While the command runs, its log handlers (the root logger's, set up by cli/main.py) drop the per-tensor INFO
    notes ONNX Runtime's quantizers log on the root logger, and the progress its histogram calibrators `print` goes
    nowhere; the handlers and stdout are as before afterwards."""
    from ..export.quantize_onnx import OrtQuantizerNotes

    notes, handlers = OrtQuantizerNotes(), list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(notes)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for handler in handlers:
            handler.removeFilter(notes)


def _coreml(args) -> int:
    from ..runtime.errors import UserError

    if args.full_range_weights:
        raise UserError("--full-range-weights applies to ONNX int8-dynamic / int8-static packages, not Core ML")
    if args.precision not in COREML_PRECISIONS:
        raise UserError(f"unknown Core ML precision {args.precision!r}; expected one of {', '.join(COREML_PRECISIONS)}")
    try:
        from ..export.coreml_quantize import quantize_coreml_package
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith("coreml_quantize"):
            raise UserError("Core ML quantization is not available in this build") from None
        raise
    from ..export.calibration import read_prompt_file

    kwargs = {}
    if args.calibration_prompts is not None:
        kwargs["calibration_prompts"] = read_prompt_file(args.calibration_prompts)
    if args.calibration_steps is not None:
        kwargs["calibration_steps"] = args.calibration_steps
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    quantize_coreml_package(args.package, args.out, args.precision, components, args.overwrite, **kwargs)
    print(f"wrote {args.out}")
    return 0
