"""Which 4-bit weight format: block size, zero points and algorithm of ONNX Runtime's MatMulNBits, measured.

For each component of an fp32 ONNX package (`edit-mobile export`), its inputs are recorded along real sampling
trajectories (the quantizer's own calibration recorder), then the component is quantized to int4-weights with every
combination of block size (32 / 64 / 128 along K), symmetric or with a zero point per block, and round-to-nearest
or HQQ, and compared with the fp32 graph on those inputs: output PSNR and the component's size relative to fp32.
int8-weights (ONNX Runtime's default block of 128) is measured beside them as the reference. One JSON object.

    python scripts/bench_int4.py PKG --json docs/bench_int4.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

CONFIGS = [(b, sym, algo) for b in (32, 64, 128) for sym, algo in ((True, "rtn"), (False, "rtn"), (False, "hqq"))]


def main() -> None:
    from edit_mobile.export import quantize_onnx as qo
    from edit_mobile.export.calibration import default_prompts, record_calibration
    from edit_mobile.export.quantize import CHECK_SAMPLES
    from edit_mobile.runtime.package import load_package

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", type=Path, help="an fp32 ONNX package (edit-mobile export)")
    parser.add_argument("--components", nargs="+", default=["transformer", "text_encoder"])
    parser.add_argument("--calibration-steps", type=int, default=4)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    package = load_package(args.package)
    calib = record_calibration(package, default_prompts(), steps=args.calibration_steps, seed=0)
    report = {"package": str(args.package), "components": {}}
    for name in args.components:
        src = package.root / package.components[name].path
        feeds = calib.subset(name, CHECK_SAMPLES)
        reference = qo.run_feeds(src, feeds)
        fp32_bytes = sum(f.stat().st_size for f in src.parent.iterdir())
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for block, symmetric, algorithm in [(None, None, "rtn"), *CONFIGS]:
                precision = "int8-weights" if block is None else "int4-weights"
                out = Path(tmp) / f"{precision}-{block}-{symmetric}-{algorithm}"
                out.mkdir()
                qo.quantize_weights(
                    src, out / "model.onnx", qo.QuantOptions(), precision, block, algorithm, symmetric=symmetric
                )
                got = qo.run_feeds(out / "model.onnx", feeds)
                rows.append(
                    {
                        "precision": precision,
                        "block_size": block or qo.WEIGHT_ONLY[precision][1],
                        "zero_point": not (symmetric if symmetric is not None else qo.WEIGHT_ONLY[precision][2]),
                        "algorithm": algorithm,
                        "psnr_db": round(qo.output_psnr(reference, got), 2),
                        "size_vs_fp32": round(sum(f.stat().st_size for f in out.iterdir()) / fp32_bytes, 4),
                    }
                )
                print(json.dumps({"component": name, **rows[-1]}), flush=True)
        report["components"][name] = rows
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
