"""Mutation check: plant known bugs one at a time and report which ones the test suite and `edit-mobile validate`
catch. A developer script (not part of the default test run): it edits the repository's source files in place and
restores each one byte for byte afterwards, so run it on a clean work tree of an editable install.

For every mutation (and first for none, which must pass everywhere): the suite runs with `pytest -x` (stop at the
first failure), then the tiny PixArt-Σ EDiT and SD3 MM-EDiT pipelines (or --models) are converted and exported with
the mutated code (once, for bugs in runtime/, which leave the graphs alone) and validated. Validation uses a prompt
longer than every tokenizer's limit, so that truncation is exercised.

usage:
  python scripts/mutation_check.py [--only NAME ...] [--tests tests/] [--skip-suite] [--json OUT]
  python scripts/mutation_check.py --models mid-pixart pixart-sigma-xl --only guidance-g-minus-1 --skip-suite
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Longer than the tiny tokenizers' limits (T5 exported at 32 tokens below, CLIP 77): truncation happens.
LONG_PROMPT = (
    "a red circle and a blue square on a white background, next to a green triangle, under a yellow "
    "sun, above a purple ring, " * 6
).strip()


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str
    what: str


MUTATIONS = [
    Mutation(
        "guidance-g-minus-1",
        "runtime/pipeline.py",
        "noise = noise_uncond + guidance * (noise_text - noise_uncond)",
        "noise = noise_uncond + (guidance - 1) * (noise_text - noise_uncond)",
        "classifier-free guidance applied with g - 1",
    ),
    Mutation(
        "guidance-cond-base",
        "runtime/pipeline.py",
        "noise = noise_uncond + guidance * (noise_text - noise_uncond)",
        "noise = noise_text + guidance * (noise_text - noise_uncond)",
        "guidance added to the conditional prediction: cond + g (cond - uncond)",
    ),
    Mutation(
        "cfg-order",
        "runtime/pipeline.py",
        "cond = {k: np.concatenate([uncond[k], cond[k]]) for k in cond}",
        "cond = {k: np.concatenate([cond[k], uncond[k]]) for k in cond}",
        "CFG batch built cond-first while the guidance line reads uncond-first",
    ),
    Mutation(
        "linear-attention-eps",
        "models/edit_attention.py",
        "y = out[..., :-1].div_(out[..., -1:] + eps)",
        "y = out[..., :-1].div_(out[..., -1:])",
        "`+ eps` dropped from the linear-attention denominator",
    ),
    Mutation(
        "linear-attention-sum",
        "models/edit_attention.py",
        "kv = torch.matmul(k.transpose(-1, -2) * (1.0 / m), v1)",
        "kv = torch.matmul(k.transpose(-1, -2), v1)",
        "sums over the M key tokens instead of means (fp16 overflow)",
    ),
    Mutation(
        "mm-edit-eta-swapped",
        "models/mm_edit_attention.py",
        "y_img = eta * y_lin + (1.0 - eta) * y_cross",
        "y_img = (1.0 - eta) * y_lin + eta * y_cross",
        "MM-EDiT's eta weights the softmax term instead of the linear one",
    ),
    Mutation(
        "dpm-lower-order-final-15",
        "runtime/schedulers.py",
        "(self.lower_order_final and n < 15)",
        "(self.lower_order_final and n <= 15)",
        "DPM-Solver's lower-order-final rule off by one at 15 steps",
    ),
    Mutation(
        "dpm-second-order-first-step",
        "runtime/schedulers.py",
        "self._lower_order_nums < 1 or lower_order_final",
        "self._lower_order_nums < 0 or lower_order_final",
        "DPM-Solver takes a second-order step before it has two model outputs",
    ),
    Mutation(
        "flow-match-shift",
        "runtime/schedulers.py",
        "sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)\n        sigmas = sigmas.astype(_F32)",
        "sigmas = sigmas.astype(_F32)",
        "SD3's flow-match timestep shift left out of set_timesteps",
    ),
    Mutation(
        "vae-scale",
        "runtime/families.py",
        'latents = latents / np.float32(vae["scaling_factor"])',
        'latents = latents * np.float32(vae["scaling_factor"])',
        "VAE latents multiplied by the scaling factor instead of divided",
    ),
    Mutation(
        "vae-shift",
        "runtime/families.py",
        'latents = latents + np.float32(vae["shift_factor"])',
        'latents = latents - np.float32(vae["shift_factor"])',
        "SD3's VAE shift factor subtracted instead of added",
    ),
    Mutation(
        "tokenizer-truncation-side",
        "runtime/tokenizer.py",
        'strategy="longest_first", direction="right")',
        'strategy="longest_first", direction="left")',
        "long prompts truncated at the start instead of the end",
    ),
]


def run(cmd: list[str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout:.0f} s")


def outcome(proc: subprocess.CompletedProcess, passed_rc: int = 0) -> str:
    """'pass', 'FAIL' (the check failed as a check should), or 'error (rc)' (it crashed / timed out)."""
    if proc.returncode == passed_rc:
        return "pass"
    return "FAIL" if proc.returncode == 1 else f"error (rc {proc.returncode})"


def check_suite(tests: list[str]) -> dict:
    start = time.monotonic()
    proc = run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], 3600, ROOT)
    failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    return {
        "result": outcome(proc),
        "first_failure": failed[0] if failed else None,
        "seconds": round(time.monotonic() - start, 1),
    }


# Models validated: name -> (resolution). The tiny ones are the presets; mid-pixart and pixart-sigma-xl (28 blocks
# at true width) come from scripts/bench_quantize.py, with random values in the new EDiT layers.
MODELS = {"tiny-pixart": "256", "tiny-sd3": "128", "mid-pixart": "512", "pixart-sigma-xl": "256"}


def export_package(model: str, work: Path) -> tuple[Path | None, str | None]:
    """Convert + export `model` with the code as it is now: (package, None) or (None, error)."""
    cli = [sys.executable, "-m", "edit_mobile.cli"]
    package = work / f"{model}-onnx"
    if model.startswith("tiny-"):  # the tiny presets are named tiny-<family>
        from edit_mobile.runtime.families import FAMILIES

        folder, arch = work / model, FAMILIES[model.removeprefix("tiny-")].convert_arch
        proc = run([*cli, "convert", model, "--arch", arch, "--out", str(folder)], 900, ROOT)
        if proc.returncode != 0:
            return None, f"convert error (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    else:
        from bench_quantize import build_source  # the sibling study (scripts/ is on sys.path as the script folder)

        (work / model).mkdir(parents=True, exist_ok=True)
        folder = build_source(model, work / model)
    proc = run(
        [
            *cli,
            "export",
            str(folder),
            "--target",
            "onnx",
            "--resolution",
            MODELS[model],
            "--max-text-tokens",
            "32",
            "--out",
            str(package),
        ],
        3600,
        ROOT,
    )
    if proc.returncode != 0:
        return None, f"export error (rc {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    return package, None


def check_validate(package: Path, work: Path) -> dict:
    """`edit-mobile validate` with the current code (exit 1 = FAILED) and what failed."""
    cli = [sys.executable, "-m", "edit_mobile.cli"]
    report = work / f"{package.name}.json"
    report.unlink(missing_ok=True)
    proc = run([*cli, "validate", str(package), "--prompt", LONG_PROMPT, "--json", str(report)], 3600, ROOT)
    result = {"result": outcome(proc)}
    if report.exists():
        r = json.loads(report.read_text())
        result.update(
            trajectory_min_db=r["trajectory_gate"]["min_psnr_db"],
            image_db=r["image"]["psnr_db"],
            loop_trajectory_min_db=r["loop"]["trajectory_min_psnr_db"],
            loop_image_db=r["loop"]["image_psnr_db"],
            failed=[k for k, c in r["components"].items() if not c["passed"]]
            + [k for k in ("trajectory_gate", "loop", "image") if not r[k]["passed"]],
        )
    elif proc.returncode != 0:
        result["detail"] = proc.stderr.strip().splitlines()[-1:]
    return result


@contextmanager
def planted(mutation: Mutation | None):
    """The source file with the mutation applied, restored byte for byte on exit."""
    if mutation is None:
        yield
        return
    path = ROOT / mutation.path
    original = path.read_bytes()
    text = original.decode()
    if text.count(mutation.old) != 1:
        raise SystemExit(
            f"mutation {mutation.name}: expected text found {text.count(mutation.old)} times in "
            f"{mutation.path}; update the mutation list"
        )
    try:
        path.write_text(text.replace(mutation.old, mutation.new))
        yield
    finally:
        path.write_bytes(original)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these mutations only (names below)")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="pytest selection (default: the suite)")
    parser.add_argument("--skip-suite", action="store_true", help="run validate only")
    parser.add_argument("--skip-validate", action="store_true", help="run the suite only")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["tiny-pixart", "tiny-sd3"],
        choices=list(MODELS),
        help="packages validated (default: the tiny ones)",
    )
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    args = parser.parse_args()
    known = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.only or [] if n not in known]
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; known: {', '.join(known)}")
    dirty = run(["git", "status", "--porcelain", "--untracked-files=no"], 60, ROOT).stdout.strip()
    if dirty:
        print(
            "warning: the work tree has uncommitted changes; they are kept, each file is restored as found",
            file=sys.stderr,
        )

    chosen: list[Mutation | None] = [None] + [known[n] for n in args.only] if args.only else [None, *MUTATIONS]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        work = Path(tmp)
        baseline: dict[str, tuple[Path | None, str | None]] = {}
        for mutation in chosen:
            name = mutation.name if mutation else "none (baseline)"
            print(f"--- {name}", file=sys.stderr, flush=True)
            row = {"mutation": name, "what": mutation.what if mutation else "the code as committed"}
            with planted(mutation):
                if not args.skip_suite:
                    row["suite"] = check_suite(args.tests)
                if not args.skip_validate:
                    row["validate"] = {}
                    for model in args.models:
                        # A runtime bug does not change the exported graphs: reuse the baseline's packages.
                        if mutation is None or not mutation.path.startswith("runtime/"):
                            sub = work / (mutation.name if mutation else "baseline")
                            sub.mkdir(exist_ok=True)
                            built = export_package(model, sub)
                            if mutation is None:
                                baseline[model] = built
                        else:
                            built = baseline[model]
                        package, error = built
                        row["validate"][model] = check_validate(package, work) if package else {"result": error}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)

    print("| mutation | suite | " + " | ".join(f"validate {m}" for m in args.models) + " |")
    print("|---|---|" + "---|" * len(args.models))
    for row in rows:
        suite = row.get("suite", {})
        suite_cell = f"{suite.get('result', '-')} {suite.get('first_failure') or ''}".strip()
        cells = [
            f"{v['result']} {', '.join(v.get('failed', []))}".strip() for v in row.get("validate", {}).values()
        ] or ["-"] * len(args.models)
        print(f"| {row['mutation']} | {suite_cell} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
