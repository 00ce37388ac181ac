"""Size and transformer latency of every precision relative to fp32, measured side by side in one run.

For each model: convert to EDiT / MM-EDiT (new layers randomised, as after distillation), export an fp32 ONNX
package, quantize it to every precision with `edit-mobile quantize`'s defaults, then
  size     transformer folder and whole package, bytes, relative to fp32;
  latency  the transformer on a recorded trajectory input, all precisions' sessions open at once and timed in
           interleaved rounds (the order rotates each round), medians, relative to fp32;
  fidelity with --validate, `edit-mobile validate` of each package: per-component PSNR against PyTorch fp32 and
           the final image's PSNR.
With --fp16-study, the fp16 block-list variants of the transformer and text encoders are also evaluated in true
fp16 arithmetic (ONNX's numpy reference evaluator: every intermediate stored in fp16, matmuls accumulated in
fp32), which ONNX Runtime's CPU provider cannot show (it computes fp16 nodes in fp32).
One JSON object per model is printed; --json writes them all.

    python scripts/bench_quantize.py --quick --validate                 # tiny-pixart EDiT, tiny-sd3 MM-EDiT, 256²
    python scripts/bench_quantize.py --models mid-pixart --resolution 512 --validate --fp16-study
    python scripts/bench_quantize.py --models pixart-sigma-xl --resolution 256
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edit_mobile.runtime.manifest import ONNX_PRECISIONS as PRECISIONS

# name -> (teacher preset or "mid", converter arch)
MODELS = {
    "tiny-pixart": ("tiny-pixart", "edit"),
    "tiny-sd3": ("tiny-sd3", "mm-edit"),
    "mid-pixart": ("mid", "edit"),
    "pixart-sigma-xl": ("pixart-sigma-xl", "edit"),
}
TARGETS = {"int8-dynamic": {"size": 0.27, "latency": 0.5}, "fp16": {"size": 0.55}}


def mid_pixart():
    """A mid-size PixArt-Σ (tens of millions of transformer parameters: width 384, 12 blocks of 6x64 heads), T5
    at width 512 (2 layers), a small SDXL-style VAE; random weights from a fixed seed."""
    from edit_mobile.models.presets import pixart_pipeline

    return pixart_pipeline(
        width=384,
        heads=6,
        head_dim=64,
        layers=12,
        sample_size=64,
        t5_width=512,
        t5_layers=2,
        t5_heads=8,
        t5_ff=1024,
        vae_blocks=(32, 64, 128, 128),
        vae_layers=1,
        vae_groups=32,
        seed=0,
    )


def build_source(model: str, root: Path) -> Path:
    """Teacher -> EDiT / MM-EDiT folder with randomised new layers (ConvFusion, compressors), as after training."""
    import torch
    from diffusers import DiffusionPipeline

    import edit_mobile.models  # noqa: F401  (registers the EDiT classes for from_pretrained)
    from edit_mobile.models.convert import convert

    teacher, arch = MODELS[model]
    if teacher == "mid":
        mid_pixart().save_pretrained(root / "teacher")
        teacher = str(root / "teacher")
    converted = convert(teacher, arch, root / "converted")
    pipe = DiffusionPipeline.from_pretrained(converted)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, param in pipe.transformer.named_parameters():
            if any(n in key for n in ("conv_fusion", "k_compressor", "v_compressor")):
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
    pipe.save_pretrained(root / "trained")
    return root / "trained"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix != ".ort")


def time_interleaved(sessions: dict, feed: dict, repeats: int) -> dict[str, list[float]]:
    names = list(sessions)
    for s in sessions.values():  # warm-up
        s.run(None, feed)
    times = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            start = time.perf_counter()
            sessions[n].run(None, feed)
            times[n].append(time.perf_counter() - start)
    return times


def fp16_study(package, calib, samples: int = 3) -> dict:
    """True-fp16 PSNR (ONNX reference evaluator, numpy fp16) of the fp16 graph with each block-list variant."""
    from onnx.reference import ReferenceEvaluator

    from edit_mobile.export import quantize_onnx as qo

    out = {}
    for name in [n for n in package.components if n == "transformer" or n.startswith("text_encoder")]:
        feeds = calib.subset(name, samples)
        with tempfile.TemporaryDirectory() as tmp:
            model = qo.load_model(package.component_path(name))
            qo.name_nodes(model)
            src = Path(tmp) / "fp32.onnx"
            qo.save_model(model, src)
            reference = qo.run_feeds(src, feeds)
            ranges = qo.tensor_ranges(src, calib.feeds[name])
            finite = [v for v in ranges.values() if v < qo.MASK_SENTINEL]
            variants = {
                "nothing blocked": {},
                "linear-attention": qo.fp16_block_list(model, None, ("linear-attention",)),
                "normalization": qo.fp16_block_list(model, None, ("normalization",)),
                "default (linear-attention + normalization + range)": qo.fp16_block_list(model, ranges),
            }
            if not variants["linear-attention"]:  # softmax-only graph (text encoders): nothing to compare
                del variants["linear-attention"]
            row = {"max_abs_activation": max(finite, default=0.0), "variants": {}}
            for label, block in variants.items():
                dst = Path(tmp) / "fp16.onnx"
                qo.convert_fp16(src, dst, block)
                evaluator = ReferenceEvaluator(str(dst))
                got = [[np.asarray(o, np.float32) for o in evaluator.run(None, f)] for f in feeds]
                ort = qo.run_feeds(dst, feeds)
                row["variants"][label] = {
                    "blocked_nodes": len(block),
                    "true_fp16_psnr_db": round(qo.output_psnr(reference, got), 2),
                    "true_fp16_finite": bool(all(np.isfinite(o).all() for g in got for o in g)),
                    "ort_cpu_psnr_db": round(qo.output_psnr(reference, ort), 2),
                    "size_bytes": dst.stat().st_size,
                }
            out[name] = row
    return out


def bench_model(
    model: str,
    resolution: int,
    repeats: int,
    threads: int,
    validate: bool,
    study: bool,
    steps: int,
    root: Path,
    study_samples: int = 2,
    precisions=PRECISIONS,
) -> dict:
    from edit_mobile.export.calibration import default_prompts, record_calibration
    from edit_mobile.export.package import export_package
    from edit_mobile.export.quantize import quantize_package
    from edit_mobile.export.quantize_onnx import make_session
    from edit_mobile.runtime.package import load_package

    t0 = time.perf_counter()
    src = build_source(model, root)
    fp32 = root / "fp32"
    export_package(str(src), fp32, resolution=resolution)
    package = load_package(fp32)
    packages = {"fp32": fp32}
    quantize_seconds = {}
    for precision in precisions:
        start = time.perf_counter()
        quantize_package(fp32, root / precision, precision, calibration_steps=steps, threads=threads)
        quantize_seconds[precision] = round(time.perf_counter() - start, 1)
        packages[precision] = root / precision
    calib = record_calibration(package, default_prompts(1), steps=steps, threads=threads)
    feed = calib.feeds["transformer"][len(calib.feeds["transformer"]) // 2]
    sessions = {}
    for p, d in packages.items():  # as the runtime opens them (runtime.backends.component_backend)
        comp = load_package(d).component("transformer")
        sessions[p] = make_session(comp.path, threads, comp.raw.get("ort_session_config"))
    times = time_interleaved(sessions, feed, repeats)
    del sessions
    median = {p: statistics.median(t) for p, t in times.items()}
    transformer_bytes = {p: folder_bytes(d / "transformer") for p, d in packages.items()}
    package_bytes = {p: folder_bytes(d) for p, d in packages.items()}
    params = sum(
        int(np.prod(t.dims))
        for t in __import__("onnx")
        .load(str(package.component_path("transformer")), load_external_data=False)
        .graph.initializer
    )
    row = {
        "model": model,
        "resolution": resolution,
        "threads": threads,
        "repeats": repeats,
        "transformer_parameters": params,
        "transformer_bytes": transformer_bytes,
        "package_bytes": package_bytes,
        "transformer_ms_median": {p: round(1000 * m, 2) for p, m in median.items()},
        "size_vs_fp32": {p: round(transformer_bytes[p] / transformer_bytes["fp32"], 3) for p in packages},
        "package_size_vs_fp32": {p: round(package_bytes[p] / package_bytes["fp32"], 3) for p in packages},
        "latency_vs_fp32": {p: round(median[p] / median["fp32"], 3) for p in packages},
        "quantize_seconds": quantize_seconds,
        "quantized_components": {
            p: json.loads((d / "manifest.json").read_text())["quantization"]["components"]
            for p, d in packages.items()
            if p != "fp32"
        },
    }
    row["targets"] = {
        p: {
            k: {
                "target": v,
                "measured": row["size_vs_fp32" if k == "size" else "latency_vs_fp32"][p],
                "met": row["size_vs_fp32" if k == "size" else "latency_vs_fp32"][p] <= v,
            }
            for k, v in t.items()
        }
        for p, t in TARGETS.items()
        if p in packages
    }
    if validate:
        from edit_mobile.export.validate import ValidationOptions
        from edit_mobile.export.validate import validate as run_validation

        row["validation"] = {}
        for p, d in packages.items():
            report = run_validation(str(d), str(src), ValidationOptions(steps=steps), threads=threads)
            row["validation"][p] = {
                "passed": report["passed"],
                "components_psnr_db": {n: round(c["psnr_db"], 2) for n, c in report["components"].items()},
                "image_psnr_db": round(report["image"]["psnr_db"], 2),
            }
    row["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(row), flush=True)  # before the (slow) study: the numbers above are complete
    if study:
        row["fp16_study"] = fp16_study(package, calib, samples=study_samples)
        print(json.dumps({"model": model, "resolution": resolution, "fp16_study": row["fp16_study"]}), flush=True)
    return row


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny-pixart and tiny-sd3 at 256² (a couple of minutes)")
    p.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=None,
        help="default: tiny-pixart tiny-sd3 mid-pixart (--quick: the tiny ones)",
    )
    p.add_argument("--resolution", type=int, default=256, help="image size in pixels (default 256)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20, --quick 10)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps for calibration and validation (default 4)")
    p.add_argument("--validate", action="store_true", help="also run edit-mobile validate on every package")
    p.add_argument("--fp16-study", action="store_true", help="also evaluate fp16 block-list variants in true fp16")
    p.add_argument("--study-samples", type=int, default=2, help="recorded inputs per component in the study")
    p.add_argument(
        "--precisions",
        nargs="+",
        choices=PRECISIONS,
        default=PRECISIONS,
        help="precisions to quantize to (default: all four)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the rows to this file as a JSON list")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    models = args.models or (["tiny-pixart", "tiny-sd3"] if args.quick else ["tiny-pixart", "tiny-sd3", "mid-pixart"])
    repeats = args.repeats or (10 if args.quick else 20)
    rows = []
    for model in models:
        with tempfile.TemporaryDirectory(prefix=f"bench-quantize-{model}-") as tmp:
            row = bench_model(
                model,
                args.resolution,
                repeats,
                args.threads,
                args.validate,
                args.fp16_study,
                args.steps,
                Path(tmp),
                args.study_samples,
                args.precisions,
            )
        rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
