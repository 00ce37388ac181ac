"""Where a one-graph ONNX export's memory peak comes from (docs/memory.md): the transformer of SRC exported and
checked against PyTorch as `edit-mobile export` does (`export_onnx`, then `onnx_parity`), with the process's peak
resident memory read before, after the export and after the check.

    python scripts/bench_export_memory.py big/xl-edit --resolution 512 --blocks 8 --out /tmp/export-memory

SRC is a preset or a diffusers folder. `--blocks N` rebuilds its transformer from its config with N blocks (random
weights), to see how the peak scales with the weights. One process per measurement: the peak only ever rises.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

import torch

from edit_mobile.export.components import pipeline_components
from edit_mobile.export.onnx_export import export_onnx, onnx_parity
from edit_mobile.models.convert import load_pipeline
from edit_mobile.models.families import pipeline_family


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--blocks", type=int, default=None, help="a random transformer with this many blocks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="where the graph goes (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.src)
    if args.blocks is not None:
        config = dict(pipe.transformer.config, num_layers=args.blocks)
        pipe.transformer = type(pipe.transformer).from_config(config).eval()
    weights_gb = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters()) / 1e9
    specs = pipeline_components(pipe, pipeline_family(pipe), (args.resolution, args.resolution), 2, None)
    spec = next(s for s in specs if s.name == "transformer").graph()
    with tempfile.TemporaryDirectory() as tmp:
        before = peak_gb()
        path = export_onnx(spec, args.out or Path(tmp))
        exported = peak_gb()
        onnx_parity(spec, path)
        checked = peak_gb()
    report = {
        "src": args.src,
        "resolution": args.resolution,
        "blocks": len(pipe.transformer.transformer_blocks),
        "weights_gb": round(weights_gb, 2),
        "peak_gb": {
            "before_export": round(before, 2),
            "after_export": round(exported, 2),
            "after_parity": round(checked, 2),
        },  # fmt: skip
        "peak_over_weights": round(checked / weights_gb, 2),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
