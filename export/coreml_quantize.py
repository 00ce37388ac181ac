"""Core ML compression of a package's ML programs with `coremltools.optimize.coreml`, into a new package.

precisions (weights of linear / conv / matmul / gather ops with at least WEIGHT_THRESHOLD elements; biases,
norms and position tables stay as they are):
  int8-weights  linear symmetric int8, one scale per output channel (constexpr_affine_dequantize)
  int4-weights  linear int4 with zero points in blocks of 32 input channels (constexpr_blockwise_shift_scale;
                programs for iOS18 / macOS15 and later)
  palettize-4   4-bit k-means palettization (constexpr_lut_to_dense), one 16-entry table per group of 16 output
                channels in programs for iOS18 / macOS15 and later, one per tensor before
  palettize-6   the same with 6 bits (64-entry tables)
  w8a8          int8 activations (quantize / dequantize pairs, ranges calibrated on recorded inputs) + int8-weights

Activation ranges for w8a8: coremltools' `linear_quantize_activations` measures them with `MLModel.predict`, which
exists only on macOS. We record real inputs with the package's own sampling loop (the trajectory recorder of
`runtime/trajectory.py` on the `coreml-reference` backend: every transformer call of every step, both CFG halves,
the tokenized prompts),
measure every intermediate tensor's range with the numpy reference executor on the very same program, and apply
the same coremltools graph passes that `linear_quantize_activations` applies to its measured ranges
(`compression::insert_prefix/suffix_quantize_dequantize_pair`, `common::dequantize_quantize_pair_elimination`).
These are internal coremltools APIs (pinned coremltools==9.0); the public function cannot run on Linux.

Every compressed program is checked twice before the package is written: its constexpr weights as expanded by
the reference executor equal coremltools' own `decompress_weights` (bit for bit), and its outputs on recorded
inputs are compared with the uncompressed program (PSNR, recorded in the manifest).
"""

from __future__ import annotations

import copy
import logging
import posixpath
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..runtime.atomic import check_output_free
from ..runtime.errors import UserError
from ..runtime.manifest import COREML_PRECISIONS, GATES_DB
from ..runtime.metrics import psnr
from ..runtime.package import load_package, read_manifest
from .coreml_export import (
    extract_function,
    import_coremltools,
    package_size,
    quiet_coremltools,
    save_multifunction,
)
from .package_writer import write_package

logger = logging.getLogger(__name__)

WEIGHT_THRESHOLD = 512  # elements: a 32x32 matrix of the tiny presets is compressed, biases and norm weights are not
COMPRESSED_OPS = ("linear", "conv", "matmul", "gather")  # consumers whose constant weights are compressed
MIN_RANGE = 1e-5  # smallest activation range: int8 scale 1e-5 / 127 stays above fp16's smallest subnormal (6e-8)
CALIBRATION_PROMPTS = (
    "a red circle on a white background",
    "a photo of a cat",
    "an oil painting of a harbour",
    "a mountain landscape at sunset",
)


# Programs for iOS18 / macOS15 and later can hold finer-grained compressed weights (constexpr_blockwise_shift_scale,
# per-block LUTs): int4 in blocks of 32 along the input axis (as ONNX's int4-weights), and palettization with one
# table per group of 16 output channels instead of one per tensor (Apple's recipe for 4-bit Stable Diffusion).
IOS18_TARGETS = ("iOS18", "macOS15")
INT4_BLOCK = 32
PALETTE_GROUP = 16


def _configs(precision: str, ios18: bool):
    import coremltools.optimize.coreml as cto

    if precision in ("int8-weights", "w8a8"):
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD
        )
    elif precision == "int4-weights":
        op = cto.OpLinearQuantizerConfig(
            mode="linear",
            dtype="int4",
            granularity="per_block",
            block_size=INT4_BLOCK,
            weight_threshold=WEIGHT_THRESHOLD,
        )
    else:
        grouped = {"granularity": "per_grouped_channel", "group_size": PALETTE_GROUP}
        tables = grouped if ios18 else {"granularity": "per_tensor"}
        op = cto.OpPalettizerConfig(
            mode="kmeans", nbits=int(precision.split("-")[1]), weight_threshold=WEIGHT_THRESHOLD, **tables
        )
    return cto.OptimizationConfig(op_type_configs={name: op for name in COMPRESSED_OPS})


def activation_ranges(program, samples: list[dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """{tensor: {"rmin", "rmax"}} over `samples` for the inputs and every intermediate numeric tensor (not outputs),
    measured by the reference executor, in the format coremltools' activation quantization passes read."""
    stats: dict[str, dict[str, float]] = defaultdict(dict)

    def update(name: str, value: np.ndarray) -> None:
        # every numeric tensor, as coremltools' own calibration records them (it also reads int32 ranges)
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)) or not value.size:
            return
        lo, hi = float(np.min(value)), float(np.max(value))
        entry = stats[name]
        entry["rmin"] = min(lo, entry.get("rmin", lo))
        entry["rmax"] = max(hi, entry.get("rmax", hi))

    outputs = set(program.output_names)
    for sample in samples:
        for name, value in sample.items():
            update(name, np.asarray(value))
        program.run(sample, observer=lambda n, v: None if n in outputs else update(n, v))
    # A (near-)constant zero tensor (e.g. a freshly converted EDiT's zero-initialised ConvFusion output) would get
    # a scale that underflows fp16 to 0, which Core ML's quantize op refuses: keep every range at least +-MIN_RANGE.
    for entry in stats.values():
        if max(abs(entry["rmin"]), abs(entry["rmax"])) < MIN_RANGE:
            entry["rmin"], entry["rmax"] = min(entry["rmin"], -MIN_RANGE), max(entry["rmax"], MIN_RANGE)
    return stats


def _quantize_activations(mlmodel, stats: dict):
    """coremltools.optimize.coreml.linear_quantize_activations with ranges measured here (see the docstring)."""
    import coremltools.optimize.coreml as cto
    from coremltools import _SPECIFICATION_VERSION_IOS_17
    from coremltools.converters.mil.frontend.milproto import load as milproto_load_module
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models import utils as model_utils
    from coremltools.optimize.coreml.experimental._model_debugger import ModelDebugger
    from coremltools.optimize.coreml.experimental._post_training_quantization import (
        _adjust_concat_surrounding_activation_stats,
    )

    config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric"))
    _adjust_concat_surrounding_activation_stats(ModelDebugger(mlmodel)._get_concat_op_info(), stats)
    passes = []
    for name in (
        "compression::insert_prefix_quantize_dequantize_pair",
        "compression::insert_suffix_quantize_dequantize_pair",
    ):
        graph_pass = PASS_REGISTRY[name]
        graph_pass.set_options([PassOption("config", config)])
        graph_pass.set_options([PassOption("activation_stats", stats)])
        passes.append(graph_pass)
    passes.append(PASS_REGISTRY["common::dequantize_quantize_pair_elimination"])
    return model_utils._apply_graph_pass(
        mlmodel,
        passes,
        spec_version=_SPECIFICATION_VERSION_IOS_17,
        pymil_load_func=milproto_load_module.load,
        skip_model_load=True,
    )


def compress_program(
    src: Path,
    dst: Path,
    precision: str,
    samples: list[dict[str, np.ndarray]] | None = None,
    deployment_target: str = "iOS17",
) -> None:
    """src .mlpackage -> dst .mlpackage compressed to `precision` (samples: calibration inputs, w8a8 only)."""
    ios18 = deployment_target in IOS18_TARGETS
    if precision == "int4-weights" and not ios18:
        raise UserError(
            f"int4-weights needs a program for iOS18 / macOS15 or later ({src.parent.name} is for "
            f"{deployment_target}): export with --deployment-target iOS18"
        )
    ct = import_coremltools()
    import coremltools.optimize.coreml as cto

    from ..runtime.mil import MILProgram

    with quiet_coremltools():
        mlmodel = ct.models.MLModel(str(src), skip_model_load=True)
        if precision == "w8a8":
            if not samples:
                raise UserError("w8a8 needs calibration inputs")
            try:
                mlmodel = _quantize_activations(mlmodel, activation_ranges(MILProgram(src), samples))
            except ValueError as e:  # e.g. a quantize op inserted on an int32 tensor (T5's position buckets)
                raise UserError(
                    f"coremltools cannot quantize the activations of {src.parent.name}: "
                    f"{str(e).splitlines()[0]} (use int8-weights for it)"
                ) from None
        if precision in ("int8-weights", "w8a8", "int4-weights"):
            mlmodel = cto.linear_quantize_weights(mlmodel, _configs(precision, ios18))
        else:
            mlmodel = cto.palettize_weights(mlmodel, _configs(precision, ios18))
        mlmodel.save(str(dst))


def check_expansion(path: Path) -> dict:
    """Every constexpr weight of the program, expanded by the reference executor, against coremltools'
    `decompress_weights` of the same saved program; raises RuntimeError on any difference."""
    ct = import_coremltools()
    import coremltools.optimize.coreml as cto

    from ..runtime.mil import MILProgram

    program = MILProgram(path)
    ours = program.constants()
    compressed = [op.outputs[0].name for op in program.ops if op.type.startswith("constexpr_")]
    with quiet_coremltools():
        decompressed = cto.decompress_weights(ct.models.MLModel(str(path), skip_model_load=True))
    with tempfile.TemporaryDirectory() as tmp:  # the decompressed program, read back like any saved package
        decompressed.save(str(Path(tmp) / "decompressed.mlpackage"))
        reference = MILProgram(Path(tmp) / "decompressed.mlpackage").constants()
    for name in compressed:
        if name not in reference:
            raise RuntimeError(f"{path}: coremltools' decompression has no constant {name!r}")
        a, b = ours[name], reference[name]
        if a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b, equal_nan=True):
            diff = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.shape == b.shape else None
            raise RuntimeError(
                f"{path}: weight {name} expands differently from coremltools' decompression "
                f"({a.dtype}{a.shape} vs {b.dtype}{b.shape}, max |diff| {diff})"
            )
    return {"compressed_weights": len(compressed), "equal_to_coremltools_decompression": True}


def record_inputs(package, prompts: list[str], steps: int, seed: int = 0) -> dict[str, list[dict]]:
    """Per component, real inputs: the package's own sampling loop on the numpy reference executor
    (`runtime/trajectory.py`)."""
    from ..runtime.trajectory import TrajectoryRecorder

    recorder = TrajectoryRecorder(package, backend="coreml-reference")
    feeds: dict[str, list[dict]] = {name: [] for name in package.components}
    for trajectory in recorder.record_prompts(prompts, steps, seed=seed):
        for name, inputs in recorder.inputs(trajectory).items():
            if name in feeds:
                feeds[name] += [feed for _, feed in inputs]
    return feeds


def _parse_components(components, available: list[str], precision: str) -> list[str]:
    if components is None:  # w8a8: the denoiser only (coremltools cannot quantize T5's integer position arithmetic)
        return [n for n in available if n == "transformer" or (n.startswith("text_encoder") and precision != "w8a8")]
    if isinstance(components, str):
        components = [c.strip() for c in components.split(",") if c.strip()]
    unknown = [c for c in components if c not in available]
    if unknown or not components:
        raise UserError(
            f"unknown component(s) {', '.join(unknown) or '(none given)'}; the package has {', '.join(available)}"
        )
    return list(dict.fromkeys(components))


def quantize_coreml_package(
    package_dir: str | Path,
    out_dir: str | Path,
    precision: str,
    components: list[str] | str | None = None,
    overwrite: bool = False,
    calibration_prompts: list[str] | None = None,
    calibration_steps: int = 4,
) -> dict:
    """Compress the Core ML programs of `components` (default: transformer and text encoders) of a Core ML package
    into a new package at `out_dir` (written atomically); returns its manifest."""

    package_dir, out_dir = Path(package_dir), Path(out_dir)
    if precision not in COREML_PRECISIONS:
        raise UserError(f"unknown Core ML precision {precision!r}; expected one of {', '.join(COREML_PRECISIONS)}")
    if out_dir.resolve() == package_dir.resolve():
        raise UserError("--out must differ from the input package (the quantized package is a new folder)")
    check_output_free(out_dir, overwrite)
    manifest = read_manifest(package_dir)
    if manifest.get("target") != "coreml":
        raise UserError(f"{package_dir} is a {manifest.get('target')!r} package, not a Core ML one")
    if calibration_steps < 1:
        raise UserError(f"calibration steps must be >= 1, got {calibration_steps}")
    package = load_package(package_dir)
    names = _parse_components(components, list(package.components), precision)
    for name in names:
        current = package.components[name].precision or "fp32"
        if current not in ("fp16", "fp32"):
            raise UserError(f"{name} is already {current}; compress the fp16 / fp32 package instead")

    start = time.perf_counter()
    prompts = list(calibration_prompts or (CALIBRATION_PROMPTS if precision == "w8a8" else CALIBRATION_PROMPTS[:1]))
    steps = calibration_steps if precision == "w8a8" else 2
    # A multi-size package: each size's program of a size-dependent component is compressed and checked on that
    # size's own recorded inputs (the text encoders once, at the default size).
    keys_of = {
        name: [package.sizes[0], *(k for k, size in package.manifest.sizes.items() if name in size.components)]
        for name in names
    }
    views = {key: package.at_size(key) for key in dict.fromkeys(k for keys in keys_of.values() for k in keys)}
    feeds = {key: record_inputs(view, prompts, steps) for key, view in views.items()}
    calibration = {"prompts": len(prompts), "steps": steps} if precision == "w8a8" else None
    new = copy.deepcopy(package.manifest)
    new.validation = None
    with write_package(out_dir, overwrite=overwrite) as writer:
        tmp = writer.root
        writer.copy_from(package, skip_components=names)
        for name in names:
            keys = keys_of[name]
            entries = {key: new.at_size(key).components[name] for key in keys}
            with tempfile.TemporaryDirectory(dir=tmp, prefix=f".{name}-") as work:
                merged: dict[str, dict] = {}  # multi-function program -> {function: its compressed program}
                for key in keys:
                    comp, entry = views[key].components[name], entries[key]
                    # one program, or each chunk's of a chunked component (on its inputs along the source chain)
                    paths = comp.chunk_paths or (comp.path,)
                    programs = zip(comp.entry.model_paths, paths, _program_samples(comp, feeds[key][name]))
                    checks = {}
                    for i, (rel, src, samples) in enumerate(programs):
                        dst = tmp / rel
                        if entry.function is not None:  # compress one function at a time, merge them again below
                            src = extract_function(src, entry.function, Path(work) / f"{key}-{i}-source.mlpackage")
                            dst = merged.setdefault(rel, {})[entry.function] = Path(work) / f"{key}-{i}.mlpackage"
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        checks[posixpath.basename(posixpath.dirname(rel))] = _compress_checked(
                            src, dst, precision, comp, samples, calibration
                        )
                    entry.quantization = checks.popitem()[1] if len(checks) == 1 else _chunks_record(checks)
                    entry.precision, entry.gate_psnr_db = precision, GATES_DB[precision]
                    logger.info("%s%s -> %s: %.1f dB vs the %s program", name, f" {key}" if len(keys) > 1 else "",
                                precision, entry.quantization["check"]["psnr_db"], comp.precision)  # fmt: skip
                for rel, functions in merged.items():
                    save_multifunction(functions, entries[keys[0]].function, tmp / rel)
            for key in keys:  # the files each entry's programs are in, as written
                comp, entry = views[key].components[name], entries[key]
                entry.quantization["size_bytes"] = {
                    "source": sum(package_size(p) for p in comp.chunk_paths or (comp.path,)),
                    "quantized": sum(package_size(tmp / rel) for rel in entry.model_paths),
                }
        new.quantization = {
            "precision": precision,
            "components": {n: precision for n in names},
            "seconds": round(time.perf_counter() - start, 1),
        }
        new = writer.finish(new)  # every file's sha256, manifest.json last
    return new.to_dict()


def _program_samples(comp, samples: list[dict]) -> list[list[dict]]:
    """The recorded inputs of each program of a component: `samples` for a single program; for a chunked one, each
    chunk's inputs as the source chain computes them from `samples` (the reference executor)."""
    from ..runtime.mil import MILProgram

    if not comp.entry.chunks:
        return [samples]
    values, per_chunk = [dict(s) for s in samples], []
    for path, chunk in zip(comp.chunk_paths, comp.entry.chunks):
        names = [s.name for s in chunk.inputs]
        per_chunk.append([{n: v[n] for n in names} for v in values])
        program = MILProgram(path, function=comp.entry.function)
        for v in values:
            v.update(program.run({n: v[n] for n in names}))
    return per_chunk


def _chunks_record(checks: dict[str, dict]) -> dict:
    """A chunked component's `quantization`: each chunk's record, the method and the worst chunk's check."""
    first = next(iter(checks.values()))
    worst = min((c["check"] for c in checks.values()), key=lambda c: c["psnr_db"])
    return {
        **{k: v for k, v in first.items() if k not in ("expansion_check", "check", "seconds")},
        "chunks": checks,
        "check": {**worst, "against": worst["against"] + ", the worst chunk"},
        "seconds": round(sum(c["seconds"] for c in checks.values()), 2),
    }


def _compress_checked(
    src: Path, dst: Path, precision: str, comp, samples: list[dict], calibration: dict | None
) -> dict:
    """Compress one one-function program and check it: its constexpr weights against coremltools' own
    decompression, its outputs against the source program on recorded inputs. Returns the manifest
    `quantization` of its entry (without sizes)."""
    t0 = time.perf_counter()
    compress_program(src, dst, precision, samples, comp.entry.deployment_target or "iOS17")
    seconds = time.perf_counter() - t0
    return {
        "method": f"coremltools.optimize.coreml ({_describe(precision, comp.entry.deployment_target)})",
        "source_precision": comp.precision,
        "weight_threshold": WEIGHT_THRESHOLD,
        "compressed_ops": list(COMPRESSED_OPS),
        "calibration": {**calibration, "samples": len(samples)} if calibration else None,
        "expansion_check": check_expansion(dst),
        "check": _compare_programs(src, dst, samples[: max(1, min(len(samples), 4))]),
        "seconds": round(seconds, 2),
    }


def _describe(precision: str, deployment_target: str | None) -> str:
    if precision.startswith("palettize"):
        grouped = deployment_target in IOS18_TARGETS
        tables = f"one table per {PALETTE_GROUP} output channels" if grouped else "per tensor"
        return f"palettize_weights, k-means {precision.split('-')[1]} bits, {tables}"
    return {
        "int8-weights": "linear_quantize_weights, int8 symmetric per channel",
        "int4-weights": f"linear_quantize_weights, int4 with zero points, blocks of {INT4_BLOCK} input channels",
        "w8a8": "int8 activations calibrated with the reference executor + linear_quantize_weights int8",
    }[precision]


def _compare_programs(src: Path, dst: Path, samples: list[dict]) -> dict:
    """Worst output PSNR of the compressed program against the source program on recorded inputs."""
    from ..runtime.mil import MILProgram

    a, b = MILProgram(src), MILProgram(dst)
    worst = float("inf")
    for sample in samples:
        ra, rb = a.run(sample), b.run(sample)
        for name in a.output_names:
            worst = min(worst, psnr(ra[name].astype(np.float32), rb[name].astype(np.float32)))
    return {
        "psnr_db": round(worst, 2),
        "samples": len(samples),
        "against": "the uncompressed program, both run by the reference executor, recorded inputs",
    }
