"""Report what each exported graph of a package contains: op histogram, parameter count, file size, dynamic
dimensions (must be none), fp64 tensors (must be none), and the ops outside the Core ML / NNAPI execution
providers' supported lists (those would run on the CPU on a phone).

example:
  edit-mobile inspect pkg --json graph-report.json
"""

from __future__ import annotations

HELP = "report ops, parameters, sizes, dynamic dims and unsupported ops of a package's graphs"


def build_parser(parser):
    parser.add_argument("package", metavar="PKG", help="package folder written by `edit-mobile export`")
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    return parser


def main(args) -> int:
    import json

    from ..export.inspect import format_report, inspect_package

    report = inspect_package(args.package)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    bad = [n for n, r in report.items() if r["dynamic_io_dims"] or r["fp64_tensors"]]
    return 1 if bad else 0
