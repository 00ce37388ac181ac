"""What EDiT's layer choices cost in quality: ConvFusion and Spatial Compressor variants distilled from the trained
shapes PixArt teacher with the same budget, scored by prompt accuracy (docs/shapes.md, docs/benchmarks.md).

Each variant is made by the product's own commands: `edit-mobile convert` of shapes-work/pixart-teacher with the
variant's EDiT configuration, `edit-mobile distill` from the teacher (the shapes student recipe of
scripts/train_shapes.py, but --steps N, default 600, for every variant: the same budget, so the variants are
compared at equal training), then `edit-mobile evaluate` on the held-out prompts. Variants (named as in the
scaling study, whose edit-config group measures their speed):
  edit          ConvFusion 3x3 conv C -> C/4, compressor stride 2 (the defaults)
  edit-nocf     no ConvFusion (queries are W_q X, as in plain ReLU linear attention)
  edit-sep      depthwise-separable ConvFusion (depthwise 3x3, then 1x1 C -> C/4)
  edit-r8       ConvFusion C -> C/8
  edit-s4       compressor stride 4 (16x fewer keys and values instead of 4x)

Per variant it records the trainer's held-out distillation losses (fixed eval batch, every 250 steps: a smooth
measure, far less noisy than accuracy on 88 prompts), the evaluation report and the number of EDiT parameters, and
writes them to --json. Resumes: a variant whose evaluation exists is skipped, a distillation resumes from its newest
checkpoint.

    python scripts/study_edit_variants.py --json docs/edit_variants.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

from train_shapes import STUDENT_ARGS

from edit_mobile.runtime.evaluate import write_json_atomic

logger = logging.getLogger("study_edit_variants")

VARIANTS = {
    "edit": [],
    "edit-nocf": ["--convfusion", "off"],
    "edit-sep": ["--convfusion", "separable"],
    "edit-r8": ["--convfusion-reduction", "8"],
    "edit-s4": ["--kv-stride", "4"],
}
NEW_LAYERS = ("conv_fusion", "k_compressor", "v_compressor")


def with_steps(args: list[str], steps: int) -> list[str]:
    """STUDENT_ARGS with --steps replaced (the recipe's other choices kept)."""
    out = list(args)
    out[out.index("--steps") + 1] = str(steps)
    return out


def edit_parameters(transformer: Path) -> int:
    """Parameters of the layers EDiT adds (ConvFusion and the compressors), from the safetensors header."""
    from safetensors import safe_open

    count = 0
    for path in transformer.glob("*.safetensors"):
        with safe_open(path, "np") as f:
            for key in f.keys():
                if any(n in key for n in NEW_LAYERS):
                    count += math.prod(f.get_slice(key).get_shape())
    return count


def run_variant(name: str, teacher: Path, work: Path, steps: int, prompts: int) -> dict:
    cli = [sys.executable, "-m", "edit_mobile.cli"]
    converted, out = work / f"{name}-converted", work / name
    report_path = work / f"{name}-evaluation.json"
    if not (converted / "model_index.json").exists():
        subprocess.run([*cli, "convert", str(teacher), "--arch", "edit", *VARIANTS[name], "--out", str(converted),
                        "--overwrite"], check=True)  # fmt: skip
    if not (out / "model_index.json").exists():
        cmd = [*cli, "distill", "--teacher", str(teacher), "--student", str(converted), "--out", str(out)]
        subprocess.run([*cmd, *with_steps(STUDENT_ARGS, steps), "--resume"], check=True)
    if not report_path.exists():
        subprocess.run([*cli, "evaluate", str(out), "--prompts", str(prompts), "--json", str(report_path)], check=True)
    state = json.loads((out / "trainer_state.json").read_text())
    report = json.loads(report_path.read_text())
    return {
        "convert_args": VARIANTS[name],
        "edit_parameters": edit_parameters(out / "transformer"),
        "eval_loss": {int(step): losses for step, losses in state["eval"].items()},
        "accuracy": report["accuracy"],
        "frechet_distance": report["frechet_distance"],
        "prompts": report["prompts"],
    }


def markdown_table(results: dict) -> str:
    """One row per variant: EDiT's own parameters, the final held-out distillation losses, prompt accuracy."""
    rows = [
        "| variant | EDiT layers' parameters | eval output loss | eval feature loss | all | shape | colour | size "
        "| background | Fréchet |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        last, acc = r["eval_loss"][max(r["eval_loss"])], r["accuracy"]
        pct = " | ".join(f"{100 * acc[k]:.0f} %" for k in ("all", "shape", "color", "size", "background"))
        rows.append(f"| `{name}` | {r['edit_parameters']:,} | {last['output']:.4f} | {last['feature']:.4f} | {pct} "
                    f"| {r['frechet_distance']:.0f} |")  # fmt: skip
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", type=Path, default=Path("shapes-work/pixart-teacher"), help="trained teacher")
    parser.add_argument("--work", type=Path, default=Path("out/edit-variants"), help="working folder")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=600, help="distillation steps of every variant")
    parser.add_argument("--prompts", type=int, default=88, help="held-out prompts (88: every one)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the subprocesses")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.variants:
        logger.info("%s: convert, distill %d steps, evaluate", name, args.steps)
        results[name] = run_variant(name, args.teacher, args.work, args.steps, args.prompts)
        r = results[name]
        last = r["eval_loss"][max(r["eval_loss"])]
        logger.info("%s: all %.3f, Fréchet %.0f, eval output loss %.4f", name, r["accuracy"]["all"],
                    r["frechet_distance"], last["output"])  # fmt: skip
    print(markdown_table(results))
    if args.json:
        doc = {"teacher": str(args.teacher), "steps": args.steps, "recipe": with_steps(STUDENT_ARGS, args.steps),
               "variants": results}  # fmt: skip
        write_json_atomic(doc, args.json)
        logger.info("wrote %s", args.json)


if __name__ == "__main__":
    main()
