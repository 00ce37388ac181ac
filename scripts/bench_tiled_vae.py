"""Tiled VAE decoding at large image sizes: the peak resident memory and the time of the decoding phase.

A tiled package's VAE decoder graph takes one tile (`export --vae-tile PX`); the runtime decodes any latent size
with it. This script decodes random latents of each requested image size through the package's tile graph, as
`generate --memory low` does in its decoding phase (the session created in the phase, the uint8 image made from
the decoder's output), each size in a fresh process so that the peaks do not mix:

    python scripts/bench_tiled_vae.py PKG --size 2048 --size 4096 --threads 2 --json docs/bench_tiled_vae.json

The image itself is meaningless here (random latents); how close a tiled decode is to an untiled one is what
`edit-mobile validate` reports for a tiled package (docs/memory.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time

import numpy as np

from edit_mobile.runtime.backends import create_backend
from edit_mobile.runtime.bench import current_rss_mb, peak_rss_mb, reset_peak_rss
from edit_mobile.runtime.heap import trim_heap
from edit_mobile.runtime.io_specs import TensorSpec
from edit_mobile.runtime.package import load_package, parse_resolution
from edit_mobile.runtime.pipeline import to_uint8
from edit_mobile.runtime.tiling import TiledBackend, tile_spec, tile_starts


def decode_once(package_dir: str, size: tuple[int, int], threads: int | None) -> dict:
    """One decode of a (height, width) image in this process: the decoding phase's peak RSS and wall time."""
    package = load_package(package_dir)
    comp = package.component("vae_decoder")
    tiling = comp.entry.tiling
    if tiling is None:
        raise SystemExit(f"{package_dir}: the VAE decoder is not tiled (export it with --vae-tile PX)")
    spec = comp.inputs[0]
    height, width = size
    factor = package.resolution[0] // package.latent_shape[1]  # pixels per latent
    full = TensorSpec(spec.name, (*spec.shape[:-2], height // factor, width // factor), spec.dtype)
    latents = np.random.default_rng(0).standard_normal(full.shape).astype(np.float32)
    rows, cols = (tile_starts(n, t, tiling.overlap, tiling.align) for n, t in zip(full.shape[-2:], tiling.tile))
    count = len(rows) * len(cols)
    baseline = current_rss_mb()
    resettable = reset_peak_rss()
    start = time.perf_counter()
    # as `generate --memory low` creates it: no CPU arena, the heap trimmed after loading (runtime/pipeline.py)
    graph = create_backend(
        "ort", comp.path, [tile_spec(spec, tiling)], comp.output_names, threads=threads, cpu_arena=False
    )
    trim_heap()
    decoder = TiledBackend(graph, tiling, [full], comp.output_names)
    image = to_uint8(decoder.run({spec.name: latents})[comp.output_names[0]])
    seconds = time.perf_counter() - start
    return {
        "image": [width, height],
        "latents": list(full.shape),
        "tile_latents": list(tiling.tile),
        "tiles": count,
        "seconds": round(seconds, 2),
        "baseline_mb": baseline,
        "decoding_peak_rss_mb": peak_rss_mb() if resettable else None,
        "image_shape": list(image.shape),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", help="an ONNX package exported with --vae-tile PX")
    parser.add_argument("--size", action="append", required=True, help="image size N or WxH (repeatable)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    results = []
    for size in args.size:
        with context.Pool(1) as pool:
            results.append(pool.apply(decode_once, (args.package, parse_resolution(size), args.threads)))
        print(json.dumps(results[-1]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"package": args.package, "threads": args.threads, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
