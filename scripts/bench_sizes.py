"""Multi-size packages measured (docs/resolutions.md): the package's size with every size against one size, the
resident memory of one process that keeps every size's transformer and VAE decoder sessions against one size's
(without and with `SharedWeights`; once the sessions are created, and after each ran once, when ONNX Runtime's
arenas hold their activations), and the transformer's step time per size and per image token.

    python scripts/bench_sizes.py SRC --resolution 1024 --resolution 768x1344 --resolution 512 --resolution 2048 \\
        --vae-tile 256 --int8 --work DIR --json docs/bench_sizes.json

SRC is a preset or a diffusers folder (e.g. the `pixart-sigma-xl` preset converted to EDiT). The packages are
exported into WORK once and reused. `--vae-tile` exports the VAE for tiles (what 2048² needs: its untiled decoder's
mid-block attention alone would take 17 GB); `--int8` also quantizes both packages' transformer and text encoder
to int8-weights (calibrated on one prompt, two steps per size: enough to pass the gate, and what the package size
needs) and compares their sizes. Memory is measured in a fresh process per case (spawn), after creating the
sessions and after running each once, as the VmRSS of that process minus its baseline after importing the runtime.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np

SIZE_DEPENDENT = ("transformer", "vae_decoder")


def _rss_mb() -> float:
    from edit_mobile.runtime.bench import current_rss_mb

    return current_rss_mb()


def _random_inputs(specs, rng) -> dict:
    from edit_mobile.runtime.io_specs import to_numpy_dtype

    return {s.name: rng.standard_normal(s.shape).astype(to_numpy_dtype(s.dtype)) for s in specs}


def sessions_memory(package_dir: str, sizes: list[str], shared: bool, run: bool = True) -> dict:
    """In this (fresh) process: the size-dependent components of `sizes`, each created (and, with `run`, run
    once)."""
    from edit_mobile.runtime.backends import component_backend
    from edit_mobile.runtime.package import load_package
    from edit_mobile.runtime.shared_weights import SharedWeights

    base = _rss_mb()
    package, rng = load_package(package_dir), np.random.default_rng(0)
    weights = SharedWeights() if shared else None
    alive = []
    for key in sizes:
        view = package.at_size(key)
        alive += [(view, name, component_backend(view, name, "ort", shared_weights=weights)) for name in SIZE_DEPENDENT]
    loaded = _rss_mb() - base
    if not run:
        return {"sizes": sizes, "shared_weights": shared, "loaded_mb": round(loaded, 1)}
    for view, name, backend in alive:  # activations: each session's arena keeps what its run needed
        backend.run(_random_inputs(view.input_specs(name), rng))
    ran = _rss_mb() - base
    return {"sizes": sizes, "shared_weights": shared, "loaded_mb": round(loaded, 1), "after_runs_mb": round(ran, 1)}


def step_time(package_dir: str, key: str, runs: int) -> dict:
    from edit_mobile.runtime.backends import component_backend
    from edit_mobile.runtime.package import load_package

    view = load_package(package_dir).at_size(key)
    backend = component_backend(view, "transformer", "ort")
    inputs = _random_inputs(view.input_specs("transformer"), np.random.default_rng(0))
    backend.run(inputs)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        backend.run(inputs)
        times.append(time.perf_counter() - start)
    tokens = int(np.prod(view.latent_shape[1:])) // 4  # patch 2
    median_ms = float(np.median(times)) * 1e3
    return {
        "size": key,
        "tokens": tokens,
        "median_ms": round(median_ms, 1),
        "us_per_token": round(1e3 * median_ms / tokens, 2),
    }


def _in_fresh_process(fn, *args):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def main() -> None:
    from edit_mobile.export.package import export_package
    from edit_mobile.export.quantize import quantize_package
    from edit_mobile.runtime.bench import folder_size_mb, machine_info
    from edit_mobile.runtime.package import load_package

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src")
    parser.add_argument("--resolution", action="append", required=True, metavar="N|WxH")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--vae-tile", type=int, metavar="PX")
    parser.add_argument("--int8", action="store_true", help="also compare the int8-weights packages' sizes")
    parser.add_argument(
        "--loaded-only", action="store_true", help="memory once the sessions exist, without running them"
    )
    parser.add_argument(
        "--package-sizes-only",
        action="store_true",
        help="measure the packages' sizes only and update them in an existing --json report (its memory and step "
        "figures stay as measured): sizes are not timings, they need no quiet machine",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    one, every = args.work / "one-size", args.work / "all-sizes"
    for out, sizes in ((one, args.resolution[:1]), (every, args.resolution)):
        if not out.is_dir():
            export_package(args.src, out, resolution=sizes, vae_tile=args.vae_tile)
    package_mb = {"fp32": {"one_size": folder_size_mb(one), "all_sizes": folder_size_mb(every)}}
    if args.int8:
        prompts = args.work / "calibration.txt"
        prompts.write_text("a red circle on a blue background\n")
        for out in (one, every):
            quantized = out.with_name(out.name + "-int8")
            if not quantized.is_dir():
                quantize_package(out, quantized, "int8-weights", calibration_prompts=prompts, calibration_steps=2)
        package_mb["int8-weights"] = {
            "one_size": folder_size_mb(f"{one}-int8"),
            "all_sizes": folder_size_mb(f"{every}-int8"),
        }
    for entry in package_mb.values():
        entry["ratio"] = round(entry["all_sizes"] / entry["one_size"], 3)
    if args.package_sizes_only:
        if not (args.json and args.json.is_file()):
            parser.error("--package-sizes-only updates an existing --json report")
        report = {**json.loads(args.json.read_text()), "package_mb": package_mb}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(package_mb, indent=2))
        return
    sizes = load_package(every, verify=False).sizes
    report = {
        "src": args.src,
        "machine": machine_info(),
        "package_mb": package_mb,
        "memory": [
            _in_fresh_process(sessions_memory, str(every), sizes[:1], False, not args.loaded_only),
            _in_fresh_process(sessions_memory, str(every), sizes, False, not args.loaded_only),
            _in_fresh_process(sessions_memory, str(every), sizes, True, not args.loaded_only),
        ],
        "steps": [step_time(str(every), key, args.runs) for key in sizes],
    }
    one = report["memory"][0]
    for case in report["memory"]:
        case["loaded_vs_one_size"] = round(case["loaded_mb"] / one["loaded_mb"], 3)
        if "after_runs_mb" in case:
            case["after_runs_vs_one_size"] = round(case["after_runs_mb"] / one["after_runs_mb"], 3)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
