"""The transformer step on ExecuTorch (XNNPACK) and on ONNX Runtime (CPU), side by side in one run, with the same
threads, fp32, int8 and int4 (docs/executorch.md):

    python scripts/bench_executorch.py SRC --resolution 512 --threads 2 --work DIR --json docs/bench_executorch.json

SRC is a preset or a diffusers folder (EDiT / MM-EDiT). Into WORK (reused when present): the ONNX package and its
transformer quantized to int8-dynamic and int4-weights (`edit-mobile quantize`: MatMulInteger, and MatMulNBits
weight-only), and the ExecuTorch packages in fp32, int8-dynamic and int4-weights (`export --target executorch
--precision ...`: torchao's int8 dynamic activations with int8 / int4 weights, XNNPACK's kernels). Each
transformer runs on the same random inputs, warm-up first, then `--runs` timed calls; the report gives the medians,
ExecuTorch's time over ONNX Runtime's and each quantized transformer's size over its fp32 one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def step_ms(package_dir: Path, threads: int, runs: int) -> float:
    from edit_mobile.runtime.backends import component_backend
    from edit_mobile.runtime.io_specs import to_numpy_dtype
    from edit_mobile.runtime.package import load_package

    package = load_package(package_dir)
    backend = component_backend(package, "transformer", threads=threads)
    rng = np.random.default_rng(0)
    inputs = {s.name: rng.standard_normal(s.shape).astype(to_numpy_dtype(s.dtype)) for s in backend.input_specs}
    backend.run(inputs)  # warm-up (ONNX Runtime plans its buffers, XNNPACK packs its weights)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        backend.run(inputs)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1e3, 2)


def main() -> None:
    from edit_mobile.export.package import export_package
    from edit_mobile.export.quantize import quantize_package
    from edit_mobile.runtime.bench import folder_size_mb, machine_info

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("--resolution", default="512")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-text-tokens", type=int, default=None)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "int8-dynamic", "int4-weights"],
                        choices=["fp32", "int8-dynamic", "int4-weights"],
                        help="without fp32, the sizes are not compared (the ONNX fp32 package is still exported: it "
                             "is what `quantize` starts from)")  # fmt: skip
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    common = {"resolution": args.resolution, "max_text_tokens": args.max_text_tokens}
    precisions = tuple(p for p in ("fp32", "int8-dynamic", "int4-weights") if p in args.precisions)
    packages = {
        (runtime, precision): args.work / (runtime if precision == "fp32" else f"{runtime}-{precision}")
        for precision in precisions
        for runtime in ("onnxruntime", "executorch")
    }
    onnx_fp32 = args.work / "onnxruntime"
    if not onnx_fp32.is_dir():
        export_package(args.src, onnx_fp32, **common)
    for precision in precisions:
        if precision != "fp32" and not packages["onnxruntime", precision].is_dir():
            quantize_package(onnx_fp32, packages["onnxruntime", precision], precision,
                             components="transformer", calibration_steps=2)  # fmt: skip
    for precision in precisions:
        out = packages["executorch", precision]
        if not out.is_dir():
            export_package(args.src, out, target="executorch",
                           precision=None if precision == "fp32" else precision, **common)  # fmt: skip
    rows = []
    for (runtime, precision), path in packages.items():
        rows.append({
            "runtime": runtime, "precision": precision, "threads": args.threads,
            "transformer_mb": folder_size_mb(path / "transformer"),
            "step_ms": step_ms(path, args.threads, args.runs),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)  # each row as it is measured: a true-size step takes minutes
    ms = {(r["runtime"], r["precision"]): r["step_ms"] for r in rows}
    mb = {(r["runtime"], r["precision"]): r["transformer_mb"] for r in rows}
    report = {
        "src": args.src,
        "resolution": args.resolution,
        "machine": machine_info(),
        "rows": rows,
        "executorch_over_onnxruntime": {p: round(ms["executorch", p] / ms["onnxruntime", p], 3) for p in precisions},
    }
    if "fp32" in precisions:
        report["size_vs_fp32"] = {
            runtime: {p: round(mb[runtime, p] / mb[runtime, "fp32"], 3) for p in precisions if p != "fp32"}
            for runtime in ("onnxruntime", "executorch")
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
