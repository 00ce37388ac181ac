"""Report what each exported graph of a package contains: op histogram, parameter count, file size, dynamic
dimensions (must be none), fp64 tensors (must be none), and the ops outside the Core ML / NNAPI execution
providers' supported lists (those would run on the CPU on a phone).

--android: for each graph of an ONNX package, how ONNX Runtime would partition it between the NNAPI, XNNPACK and
Core ML execution providers and the CPU (ONNX Runtime's own usability checker): supported nodes, partitions, the
share of the FLOPs and of the attention layers' nodes the provider takes, and the ops left on the CPU.

example:
  edit-mobile inspect pkg --json graph-report.json
  edit-mobile inspect pkg --android --json partitions.json
"""

from __future__ import annotations

HELP = "report ops, parameters, sizes, dynamic dims and unsupported ops of a package's graphs"


def build_parser(parser):
    parser.add_argument("package", metavar="PKG", help="package folder written by `edit-mobile export`")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    parser.add_argument(
        "--android", action="store_true", help="report the execution-provider partitions instead (ONNX packages)"
    )
    return parser


def main(args) -> int:
    import json

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
    bad = [n for n, r in report.items() if r["dynamic_io_dims"] or r["fp64_tensors"]]
    return 1 if bad else 0
