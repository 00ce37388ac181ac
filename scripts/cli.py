"""`edit-mobile`: the one console command. Each subcommand lives in its own module under scripts/.

Subcommand modules import only the standard library at module level and their heavy dependencies inside
`main`, so `edit-mobile generate` runs where torch is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..runtime.errors import UserError

# name -> module under edit_mobile.scripts; each has build_parser(parser) and main(args)
SUBCOMMANDS = ["convert", "export", "inspect", "generate", "validate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edit-mobile",
        description="Put efficient diffusion transformers (EDiT / MM-EDiT) on phones and laptops: convert "
        "diffusers models, export them to ONNX / ONNX Runtime mobile / Core ML, quantize, run, validate, bench.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"edit_mobile.scripts.{name}")
        sub_parser = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.build_parser(sub_parser)
        sub_parser.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return int(args._main(args) or 0)
    except UserError as e:
        print(f"edit-mobile {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
