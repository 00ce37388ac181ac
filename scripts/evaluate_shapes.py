"""The evaluation table of docs/shapes.md for one shapes family: the teacher, its student without distillation (the
fresh `convert`) and with it, and the student's packages — ONNX fp32 / fp16 / int8-dynamic / int8-static /
int8-weights, Core ML fp16 / int8-weights / palettize-6 / palettize-4 / w8a8 — each scored by `edit-mobile evaluate`
on the same held-out prompts and seeds, each package also validated against the student in PyTorch (its PSNR).

Every row is written to OUT/<row>.json as it completes and reused when the script runs again, so it resumes.

    python scripts/evaluate_shapes.py --family pixart --prompts 88          # shapes-work/eval-pixart/
    python scripts/evaluate_shapes.py --family pixart --rows teacher student onnx-fp32
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from edit_mobile.export.coreml_quantize import quantize_coreml_package
from edit_mobile.export.package import export_package
from edit_mobile.export.quantize import quantize_package
from edit_mobile.export.validate import ValidationOptions, validate
from edit_mobile.runtime.evaluate import evaluate, write_json_atomic

logger = logging.getLogger("evaluate_shapes")

ARCH = {"pixart": "edit", "sd3": "mm-edit"}
ONNX = ("fp32", "fp16", "int8-dynamic", "int8-static", "int8-weights")
COREML = ("fp16", "int8-weights", "palettize-6", "palettize-4", "w8a8")


def rows(work: Path, family: str) -> dict[str, Path | tuple]:
    """Row name -> a pipeline folder, or (target, precision) for a package of the student."""
    arch = ARCH[family]
    out: dict = {
        "teacher": work / f"{family}-teacher",
        "student-undistilled": work / f"{family}-{arch}-converted",
        "student": work / f"{family}-{arch}",
    }
    out.update({f"onnx-{p}": ("onnx", p) for p in ONNX})
    out.update({f"coreml-{p}": ("coreml", p) for p in COREML})
    return out


def package(packages: Path, student: Path, target: str, precision: str, threads: int | None) -> Path:
    """The student's package at this precision, built once (export, then quantize the fp32 / fp16 export)."""
    base = packages / f"{target}-{'fp32' if target == 'onnx' else 'fp16'}"
    if not base.is_dir():
        options = {"compute_precision": "fp16"} if target == "coreml" else {}
        export_package(str(student), base, target=target, resolution=64, **options)  # at its trained text length
    path = packages / f"{target}-{precision}"
    if not path.is_dir():
        if target == "coreml":
            quantize_coreml_package(base, path, precision)
        else:
            quantize_package(base, path, precision, threads=threads)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(ARCH), required=True)
    parser.add_argument("--work", type=Path, default=Path("shapes-work"))
    parser.add_argument("--out", type=Path, default=None, help="default WORK/eval-FAMILY")
    parser.add_argument("--prompts", type=int, default=88, help="held-out prompts (88: every held-out combination)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", nargs="+", default=None, help="only these rows")
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = args.out or args.work / f"eval-{args.family}"
    (out / "packages").mkdir(parents=True, exist_ok=True)
    table = rows(args.work, args.family)
    student = table["student"]
    for name, what in table.items():
        if args.rows and name not in args.rows:
            continue
        result = out / f"{name}.json"
        if result.is_file():
            continue
        logger.info("%s: evaluating", name)
        row = {}
        if isinstance(what, tuple):
            target = package(out / "packages", student, *what, args.threads)
            opts = ValidationOptions(prompt="a large red circle on a white background")
            report = validate(str(target), reference=str(student), opts=opts, threads=args.threads)
            row["validation"] = {
                "image_psnr_db": report["image"]["psnr_db"],
                "components_psnr_db": {n: c["psnr_db"] for n, c in report["components"].items()},
                "passed": report["passed"],
            }
        else:
            target = what
        row["evaluation"] = evaluate(target, prompts=args.prompts, steps=args.steps, threads=args.threads)
        write_json_atomic(row, result)
    for name in table:
        if (out / f"{name}.json").is_file():
            row = json.loads((out / f"{name}.json").read_text())
            acc, e = row["evaluation"]["accuracy"], row["evaluation"]
            psnr = row.get("validation", {}).get("image_psnr_db")
            print(
                f"| {name} | {acc['all']:.0%} | {acc['shape']:.0%} | {acc['color']:.0%} | {acc['size']:.0%} | "
                f"{acc['background']:.0%} | {e['frechet_distance']:.0f} | {'' if psnr is None else f'{psnr:.1f}'} |"
            )


if __name__ == "__main__":
    main()
