"""Report what each exported graph of a package contains: op histogram, parameter count, file size, dynamic
dimensions (must be none), fp64 tensors (must be none), and the ops outside the Core ML / NNAPI execution
providers' supported lists (those would run on the CPU on a phone). ExecuTorch packages: per program, the share of
the operators and of the FLOPs its delegate (XNNPACK or Core ML) took, and every operator left to the portable CPU
kernels.

--android: for each graph of an ONNX package, how ONNX Runtime would partition it between the NNAPI, XNNPACK and
Core ML execution providers and the CPU (ONNX Runtime's own usability checker): supported nodes, partitions, the
share of the FLOPs and of the attention layers' nodes the provider takes, and the ops left on the CPU.

example:
  edit-mobile inspect pkg --json graph-report.json
  edit-mobile inspect pkg --android --json partitions.json
  edit-mobile inspect pkg --budget-mb 5000          # predicted peak memory per phase; exit 1 if it cannot fit
"""

from __future__ import annotations

HELP = "report ops, parameters, sizes, dynamic dims and unsupported ops of a package's graphs"


def build_parser(parser):
    parser.add_argument("package", metavar="PKG", help="package folder written by `edit-mobile export`")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    parser.add_argument(
        "--android", action="store_true", help="report the execution-provider partitions instead (ONNX packages)"
    )
    parser.add_argument(
        "--budget-mb",
        type=float,
        default=None,
        metavar="MB",
        help="predict the peak memory of each phase (load, text encoding, denoising, decoding) in both memory "
        "modes and say whether the package fits in MB (exit 1 if not even --memory low does)",
    )
    return parser


def main(args) -> int:
    import json

    from ..runtime.errors import UserError

    if args.budget_mb is not None:
        from ..export.budget import fits, format_prediction, predict

        if not args.budget_mb > 0:
            raise UserError(f"--budget-mb must be positive, got {args.budget_mb}")
        prediction = predict(args.package)
        print(format_prediction(prediction, args.budget_mb))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({**prediction, "budget_mb": args.budget_mb, "fits": fits(prediction, args.budget_mb)}, f)
        return 0 if fits(prediction, args.budget_mb)["low"] else 1
    if args.android:
        from ..export.partitions import android_report as build
        from ..export.partitions import format_android_report as describe
    else:
        from ..export.inspect import format_report as describe
        from ..export.inspect import inspect_package as build

    report = build(args.package)
    print(describe(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.android:
        return 0
    bad = [n for n, r in report.items() if r.get("dynamic_io_dims") or r.get("fp64_tensors")]
    return 1 if bad else 0
