"""`edit-mobile`: the one console command. Each subcommand lives in its own module of this package.

Subcommand modules import only the standard library at module level and their heavy dependencies inside
`main`, so `edit-mobile generate` runs where torch is not installed.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..runtime.errors import UserError

# command name -> module under edit_mobile.cli; each has HELP, build_parser(parser) and main(args).
# (inspect lives in inspect_package.py: a module named `inspect` shadows the standard library's wherever its folder
# lands on sys.path.)
SUBCOMMANDS = {
    "demo": "demo",
    "convert": "convert",
    "distill": "distill",
    "export": "export",
    "quantize": "quantize",
    "inspect": "inspect_package",
    "generate": "generate",
    "validate": "validate",
    "bench": "bench",
    "evaluate": "evaluate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edit-mobile",
        description="Put efficient diffusion transformers (EDiT / MM-EDiT) on phones and laptops: convert "
        "diffusers models, export them to ONNX / ONNX Runtime mobile / Core ML, quantize, run, validate, bench.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(f"edit_mobile.cli.{module_name}")
        sub_parser = sub.add_parser(
            name, help=module.HELP, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.build_parser(sub_parser)
        sub_parser.set_defaults(_main=module.main)
    return parser


# Top-level packages of the optional extras: in the base install (the on-device runtime), a command that needs one
# names the extra to install instead of ending in a ModuleNotFoundError traceback.
_EXTRA_OF = {
    name: "torch"
    for name in (
        "torch",
        "diffusers",
        "transformers",
        "accelerate",
        "safetensors",
        "onnx",
        "onnxscript",
        "sentencepiece",
        "matplotlib",
        "psutil",
    )
}
_EXTRA_OF.update(coremltools="coreml", sklearn="coreml", executorch="executorch", torchao="executorch")


def _hide_torchvision_notice(record: logging.LogRecord) -> bool:
    # diffusers' SD3 pipeline module imports transformers' SigLIP / CLIP image processors, and transformers then
    # says that torchvision is missing. No command here processes images with them: the notice is only noise.
    return "requires torchvision (not installed)" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    logging.getLogger("transformers.utils.import_utils").addFilter(_hide_torchvision_notice)
    try:
        return int(args._main(args) or 0)
    except UserError as e:
        print(f"edit-mobile {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = _EXTRA_OF.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(
            f"edit-mobile {args.command}: error: this command needs {e.name}, which the base install leaves out: "
            f"pip install 'edit-mobile[{extra}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
