"""`edit-mobile quantize`: an fp32 ONNX package -> a new package with fp16 / int8 components, atomically.

One precision per component (`--precision int8-dynamic`, or `transformer=int8-dynamic,vae_decoder=fp16`). The
calibration data are the package's own component inputs recorded along sampling trajectories
(`calibration.record_calibration`); each quantized component is checked against its fp32 graph on held-out
recorded inputs, and its manifest entry records the precision, how it was made, the fidelity gate that
`edit-mobile validate` applies to it, and the new files' sha256.
"""

from __future__ import annotations

import copy
import logging
import posixpath
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from ..runtime.atomic import check_output_free
from ..runtime.errors import UserError
from ..runtime.manifest import GATES_DB, ONNX_PRECISIONS
from ..runtime.package import Package, installed_version, load_package, read_manifest
from ..runtime.tiling import tiles
from . import quantize_onnx as qo
from .calibration import (
    DEFAULT_PROMPT_COUNT,
    DEFAULT_STEPS,
    CalibrationSet,
    default_prompts,
    read_prompt_file,
    record_calibration,
    record_text_inputs,
    spread,
)
from .package_writer import write_package
from .shared_weights import share_weights
from .targets import export_target

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = qo.CALIBRATION_METHODS
# Components quantized when --components is not given. fp16: every model. int8: the transformer (most weights and
# all the per-step compute) and the text encoders (run once); the VAE stays fp32: its convolutions do not
# quantize with the dynamic / weight-only ONNX Runtime quantizers, and static int8 of the decoder costs the most
# image PSNR per byte saved (docs/quantization.md). int4: the transformer only; a text encoder at 4 bits is a choice
# to make per model with its gate in view (tiny presets' random CLIP encoders: 16-21 dB, under the 25 dB gate;
# the trained shapes T5: 27 dB), so it is named explicitly: --precision text_encoder=int4-weights,...
DEFAULT_COMPONENTS = {
    "int8": ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"),
    "int4": ("transformer",),
}
CHECK_SAMPLES = 8  # recorded inputs per component on which each result is compared with its fp32 graph
SENSITIVITY_MARGIN_DB = 10.0  # the sensitivity pass excludes node groups until PSNR >= gate + this margin
SENSITIVITY_MAX_FRACTION = 0.25  # ... or until this share of the node groups is excluded


def parse_plan(precision: str, components: str | None, available: list[str]) -> dict[str, str]:
    """`--precision` (one name, or `comp=prec,...`) and `--components` -> {component: precision}."""
    text = (precision or "").strip()
    if not text:
        raise UserError(f"--precision is empty; expected one of {', '.join(ONNX_PRECISIONS)}")
    plan: dict[str, str] = {}
    if "=" in text:
        if components:
            raise UserError("give either --precision COMP=PREC,... or --precision PREC --components ..., not both")
        for item in text.split(","):
            name, _, prec = (s.strip() for s in item.partition("="))
            plan[name] = prec
    else:
        if text not in ONNX_PRECISIONS:
            raise UserError(f"unknown precision {text!r}; expected one of {', '.join(ONNX_PRECISIONS)}")
        if components:
            names = [c.strip() for c in components.split(",") if c.strip()]
            if not names:
                raise UserError("--components is empty")
        elif text == "fp16":
            names = list(available)
        else:
            names = [c for c in DEFAULT_COMPONENTS[text.split("-")[0]] if c in available]
        plan = {name: text for name in names}
    for name, prec in plan.items():
        if name not in available:
            raise UserError(f"unknown component {name!r}; this package has {', '.join(available)}")
        if prec not in ONNX_PRECISIONS:
            raise UserError(f"unknown precision {prec!r} for {name}; expected one of {', '.join(ONNX_PRECISIONS)}")
    return plan


def _source_onnx(path: Path, name: str) -> Path:
    """The ONNX graph of a component's model file (an ort-mobile package keeps model.onnx next to model.ort)."""
    if path.suffix == ".ort":
        path = path.with_suffix(".onnx")
        if not path.is_file():
            raise UserError(f"{name}: {path.name} is missing next to the .ort file; re-export the package")
    return path


def _files_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix != ".ort")


def quantize_package(
    package_dir: str | Path,
    out: str | Path,
    precision: str,
    components: str | None = None,
    calibration_prompts: str | Path | None = None,
    calibration_steps: int = DEFAULT_STEPS,
    calibration_method: str = "minmax",
    per_channel: bool = False,
    sensitivity: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
    seed: int = 0,
    keep_8bit: int = 0,
    full_range_weights: bool = False,
) -> dict:
    """Write a quantized copy of the package in `package_dir` to `out`; returns the new manifest."""
    package_dir, out = Path(package_dir), Path(out)
    if out.resolve() == package_dir.resolve():
        raise UserError("--out must differ from the input package (the quantized package is a new folder)")
    check_output_free(out, overwrite)
    manifest = read_manifest(package_dir)
    if manifest.get("target") == "coreml":
        raise UserError("this is a Core ML package: `edit-mobile quantize` dispatches it to the Core ML quantizer")
    package = load_package(package_dir)
    plan = parse_plan(precision, components, list(package.components))
    for name in plan:
        current = package.components[name].precision or "fp32"
        if current != "fp32":
            raise UserError(f"{name} is already {current}; quantize the fp32 package instead")
    if calibration_method not in CALIBRATION_METHODS:
        raise UserError(
            f"unknown --calibration-method {calibration_method!r}; expected one of {', '.join(CALIBRATION_METHODS)}"
        )
    if calibration_steps < 1:
        raise UserError(f"--calibration-steps must be >= 1, got {calibration_steps}")
    if keep_8bit < 0 or keep_8bit and "int4-weights" not in plan.values():
        raise UserError(f"--keep-8bit K needs K >= 0 and an int4-weights component, got {keep_8bit}")
    if full_range_weights and not {"int8-dynamic", "int8-static"} & set(plan.values()):
        raise UserError("--full-range-weights applies to int8-dynamic and int8-static components only")
    prompts = read_prompt_file(calibration_prompts) if calibration_prompts is not None else default_prompts()

    start = time.perf_counter()
    # A multi-size package: the size-dependent components in the plan are quantized per size, each calibrated on
    # its own size's trajectories, and their graphs then share one weights file again (export/shared_weights.py).
    sized = {key: [n for n in plan if n in size.components] for key, size in package.manifest.sizes.items()}
    # Only the VAE encoder calibrates on decoded images; without it the decode is skipped (at 2048² the tiled
    # decode was most of the calibration time).
    kw = dict(steps=calibration_steps, seed=seed, threads=threads, decode="vae_encoder" in plan)
    if all(name.startswith("text_encoder") for name in plan):  # their inputs need no model run
        calib = record_text_inputs(package, prompts, list(plan))
    else:
        calib = record_calibration(package, prompts, **kw)
    views = {key: package.at_size(key) for key, names in sized.items() if names}
    size_calib = {key: record_calibration(view, prompts, **kw) for key, view in views.items()}
    logger.info("calibration recorded in %.1f s", time.perf_counter() - start)
    new = copy.deepcopy(package.manifest)
    packaging = export_target(package.target)  # what an ONNX file becomes in this target (ort-mobile: .ort)
    new.validation = None
    with write_package(out, overwrite=overwrite) as writer:
        tmp = writer.root
        writer.copy_from(package, skip_components=plan)
        for name, prec in plan.items():
            entry = new.components[name]
            info = quantize_component(
                package,
                name,
                prec,
                tmp / name,
                calib,
                per_channel=per_channel,
                calibration_method=calibration_method,
                sensitivity=sensitivity,
                threads=threads,
                keep_8bit=keep_8bit if prec == "int4-weights" else 0,
                full_range_weights=full_range_weights,
            )
            entries = {key: new.sizes[key].components[name] for key in views if name in sized[key]}
            if entries:  # the other sizes' graphs of this component, then one weights file for all of them
                for key in entries:
                    entries[key].quantization = quantize_component(
                        views[key], name, prec, tmp / name / f".size-{key}", size_calib[key], per_channel=per_channel,
                        calibration_method=calibration_method, sensitivity=sensitivity, threads=threads,
                        keep_8bit=keep_8bit if prec == "int4-weights" else 0, full_range_weights=full_range_weights,
                    )  # fmt: skip
                info["shared_weights"] = {}
                for folder in dict.fromkeys(posixpath.dirname(rel) for rel in entry.model_paths):  # chunk-NN/ each
                    sub = posixpath.relpath(folder, name)  # "." or "chunk-NN"
                    graphs = [
                        tmp / folder / "model.onnx",
                        *(tmp / name / f".size-{k}" / sub / "model.onnx" for k in entries),
                    ]
                    targets = [tmp / folder / "model.onnx", *(tmp / folder / f"model_{k}.onnx" for k in entries)]
                    info["shared_weights"][folder] = share_weights(graphs, targets)
                for key in entries:
                    shutil.rmtree(tmp / name / f".size-{key}")
            for key, e in [("", entry), *entries.items()]:
                stem = "model" if key == "" else f"model_{key}"
                # ort-mobile: model.ort beside each model.onnx
                rels = [
                    packaging.convert(tmp / posixpath.dirname(rel) / f"{stem}.onnx").relative_to(tmp).as_posix()
                    for rel in e.model_paths
                ]
                e.path = rels[0]
                e.chunks = tuple(replace(c, path=rel) for c, rel in zip(e.chunks, rels))
                e.precision = prec
                e.gate_psnr_db = GATES_DB[prec]
                if prec == "int8-dynamic" or prec in qo.WEIGHT_ONLY:
                    e.ort_session_config = dict(qo.WEIGHT_DQ_SESSION_CONFIG)
            entry.quantization = info
        # ort-mobile: the operator list
        packaging.finish(tmp, [tmp / rel for e in new.components.values() for rel in e.model_paths])
        new.quantization = {
            "from": str(package_dir),
            "components": dict(plan),
            "calibration": {
                **calib.summary(),
                "prompt_source": str(calibration_prompts)
                if calibration_prompts
                else f"models/assets/prompts.txt ({DEFAULT_PROMPT_COUNT} spread evenly)",
            },
            "seconds": round(time.perf_counter() - start, 1),
        }
        new.tools["onnxruntime"] = installed_version("onnxruntime")
        new = writer.finish(new)  # every file's sha256, manifest.json last
    return new.to_dict()


def quantize_component(
    package: Package,
    name: str,
    precision: str,
    out_dir: Path,
    calib: CalibrationSet,
    threads: int | None = None,
    **options,
) -> dict:
    """Quantize one component into `out_dir` (model.onnx, or chunk-NN/model.onnx for a chunked component); returns
    its manifest `quantization`. `options`: quantize_graph's per_channel, calibration_method, sensitivity,
    keep_8bit, full_range_weights."""
    comp = package.component(name)
    feeds = calib.feeds[name]
    if not feeds:
        raise UserError(f"no calibration inputs were recorded for {name}")
    about = {"prompts": len(calib.prompts), "steps": calib.steps}
    if comp.entry.tiling is not None:  # the graph takes tiles: calibrate and check it on the recorded inputs' tiles
        (key,) = feeds[0]
        feeds = spread([{key: t} for f in feeds for t in tiles(f[key], comp.entry.tiling)], max(len(feeds), 16))
    if not comp.entry.chunks:
        src = _source_onnx(comp.path, name)
        check = spread(feeds, CHECK_SAMPLES)
        return quantize_graph(src, name, precision, out_dir, feeds, check, about, threads=threads, **options)
    # A chunked component: each chunk quantized on its own inputs along the recorded trajectories (what the fp32
    # chain computes from the component's recorded inputs), then the whole chain checked against the fp32 chain.
    # One chunk's graph is in memory at a time (a true-size T5-XXL is 19 GB in fp32).
    start = time.perf_counter()
    sources = [_source_onnx(path, name) for path in comp.chunk_paths]
    values = [dict(f) for f in feeds]  # every value of the fp32 chain, per recorded feed
    chunks = {}
    for src, chunk in zip(sources, comp.entry.chunks):
        label = f"{name}.{src.parent.name}"
        chunk_feeds = [{s.name: v[s.name] for s in chunk.inputs} for v in values]
        _run_chunk(src, chunk, values, threads)
        check = spread(chunk_feeds, CHECK_SAMPLES)
        chunks[label] = quantize_graph(
            src, label, precision, out_dir / src.parent.name, chunk_feeds, check, about, threads=threads, **options
        )
    reference = spread(values, CHECK_SAMPLES)  # the fp32 chain's values on the check feeds
    got = [{s.name: r[s.name] for s in comp.inputs} for r in reference]
    for src, chunk in zip(sources, comp.entry.chunks):
        _run_chunk(out_dir / src.parent.name / "model.onnx", chunk, got, threads)
    outputs = comp.output_names
    return {
        "source_precision": "fp32",
        "chunks": chunks,
        "excluded_nodes": {n: r for c in chunks.values() for n, r in c["excluded_nodes"].items()},
        "check": {
            "psnr_db": round(
                qo.output_psnr([[r[n] for n in outputs] for r in reference], [[g[n] for n in outputs] for g in got]), 2
            ),
            "samples": len(got),
            "against": "the fp32 chain of chunks on ONNX Runtime CPU, recorded inputs",
        },
        "size_bytes": {k: sum(c["size_bytes"][k] for c in chunks.values()) for k in ("fp32", "quantized")},
        "seconds": round(time.perf_counter() - start, 1),
    }


def _run_chunk(path: Path, chunk, values: list[dict], threads: int | None) -> None:
    """One chunk of a chained component on every feed in `values`, adding its outputs to each (in place)."""
    session = qo.make_session(path, threads)
    names = [s.name for s in chunk.outputs]
    for v in values:
        outs = session.run(names, {s.name: v[s.name] for s in chunk.inputs})
        v.update(zip(names, (o.astype(np.float32) for o in outs)))


def quantize_graph(
    src: Path,
    name: str,
    precision: str,
    out_dir: Path,
    feeds: list[dict],
    check_feeds: list[dict],
    about: dict,
    per_channel: bool = False,
    calibration_method: str = "minmax",
    sensitivity: bool = False,
    threads: int | None = None,
    keep_8bit: int = 0,
    full_range_weights: bool = False,
) -> dict:
    """Quantize one ONNX graph into `out_dir/model.onnx` (+ external data), calibrated on `feeds` and checked on
    `check_feeds` against the fp32 graph; returns its manifest `quantization` (`about`: the calibration run)."""
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / "model.onnx"
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{name}-work-") as work:
        work = Path(work)
        # A named copy: block / exclusion lists refer to nodes by name; a few exported nodes have none.
        model = qo.load_model(src)
        qo.name_nodes(model)
        qo.mark_preprocessed(model)  # exported models already had ONNX Runtime's pre-processing: no hint for it
        named = work / "fp32.onnx"
        qo.save_model(model, named)
        reference = qo.run_feeds(named, check_feeds, threads)
        info: dict = {
            "source_precision": "fp32",
            "per_channel": None,
            "calibration": {**about, "samples": len(feeds), "method": None},
        }
        if precision == "fp16":
            ranges = qo.tensor_ranges(named, feeds)
            block = qo.fp16_block_list(model, ranges)
            qo.convert_fp16(named, dst, block)
            info.update(
                method="onnxruntime.transformers.float16.convert_float_to_float16",
                keep_io_types=True,
                fp16_blocked_nodes=_by_reason(block),
                fp16_block_reasons={k: qo.FP16_BLOCK_REASONS[k] for k in sorted(set(block.values()))},
                max_abs_activation=float(max((v for v in ranges.values() if v < qo.MASK_SENTINEL), default=0.0)),
            )
            excluded = {}
        else:
            opts = qo.QuantOptions(
                per_channel=per_channel,
                calibration_method=calibration_method,
                full_range_weights=full_range_weights,
                exclude=default_int8_exclusions(model, precision),
            )
            quantize = _int8_quantizer(precision, named, work, feeds, opts)
            if sensitivity:
                info["sensitivity"] = sensitivity_pass(
                    model, precision, quantize, opts, reference, check_feeds, GATES_DB[precision], threads
                )
                opts.exclude.update({n: "sensitivity" for n in info["sensitivity"]["excluded_nodes"]})
            else:
                info["sensitivity"] = None
            keep: list[str] = []
            if keep_8bit:  # the K node groups that lose the most alone at 4 bits get 8 bits
                groups, scores = group_scores(model, precision, quantize, opts, reference, check_feeds, threads)
                worst = sorted(groups, key=lambda k: scores[k])[:keep_8bit]
                keep = [n for g in worst for n in groups[g]]
                info["keep_8bit"] = {
                    "k": keep_8bit,
                    "groups": worst,
                    "group_psnr_db_at_4bit": dict(sorted(scores.items(), key=lambda kv: kv[1])),
                }
            result_info = quantize(opts.exclude, dst, keep)
            info.update(result_info, per_channel=per_channel)
            if precision == "int8-static":
                info["calibration"]["method"] = calibration_method
            excluded = opts.exclude
        info["excluded_nodes"] = dict(sorted(excluded.items()))
        got = qo.run_feeds(dst, check_feeds, threads)
        info["check"] = {
            "psnr_db": round(qo.output_psnr(reference, got), 2),
            "samples": len(check_feeds),
            "against": "the fp32 ONNX component on ONNX Runtime CPU, recorded inputs",
        }
        # ONNX files only: an ort-mobile component folder also holds model.ort (made after this).
        info["size_bytes"] = {"fp32": _files_size(src.parent), "quantized": _files_size(out_dir)}
    info["seconds"] = round(time.perf_counter() - start, 1)
    logger.info(
        "%s -> %s: %.1f dB vs fp32 on %d recorded inputs, %.2fx the size",
        name,
        precision,
        info["check"]["psnr_db"],
        len(check_feeds),
        info["size_bytes"]["quantized"] / max(info["size_bytes"]["fp32"] or 1, 1),
    )
    return info


def _by_reason(block: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for node, reason in sorted(block.items()):
        out.setdefault(reason, []).append(node)
    return out


# Why some nodes are never int8 by default (node -> reason in the manifest's `excluded_nodes`).
INT8_EXCLUSION_REASONS = {
    "input-reader": "reads the raw latent input, whose scale changes along the trajectory (x100 between the first "
    "and the last step measured on the tiny presets): one static activation scale cannot cover "
    "every timestep (14 dB on tiny-pixart EDiT when quantized)",
    "linear-attention": "EDiT linear-attention accumulator: numerator and denominator come from one matmul; an int8 "
    "denominator error divides through the whole output",
    "activation-matmul": "a matmul of two activations (attention scores Q K^T, attention-weighted values): "
    "per-prompt, per-head ranges that one calibrated scale fits badly",
}


def default_int8_exclusions(model: onnx.ModelProto, precision: str) -> dict[str, str]:
    """Nodes kept in float by default. Only static int8 quantizes activations with fixed scales; the dynamic and
    weight-only quantizers touch only constant-weight MatMuls, which these nodes are not (except input readers,
    which they quantize safely: their activation scale is computed at run time or not quantized at all)."""
    if precision != "int8-static":
        return {}
    excl = {n: "input-reader" for n in qo.graph_input_readers(model)}
    excl.update({n: "linear-attention" for n in qo.linear_attention_nodes(model)})
    weighted = set(qo.weighted_nodes(model))
    excl.update(
        {
            n.name: "activation-matmul"
            for n in model.graph.node
            if n.op_type == "MatMul" and n.name not in weighted and n.name not in excl
        }
    )
    return excl


def _int8_quantizer(precision: str, src: Path, work: Path, feeds: list[dict], opts: qo.QuantOptions):
    """A function (exclude: dict, dst: Path) -> info dict for this precision (static ranges calibrated once)."""
    cache = work / "calibration.json"

    def run(exclude: dict, dst: Path, keep_8bit=()) -> dict:
        o = replace(opts, exclude=dict(exclude))
        if precision == "int8-dynamic":
            return qo.quantize_dynamic_int8(src, dst, o)
        if precision == "int8-static":
            return qo.quantize_static_int8(src, dst, feeds, o, cache=cache)
        if precision in qo.WEIGHT_ONLY:
            return qo.quantize_weights(src, dst, o, precision, keep_8bit=keep_8bit)
        raise ValueError(precision)

    return run


def quantizable_nodes(model: onnx.ModelProto, precision: str) -> list[str]:
    """The nodes a precision changes: constant-weight MatMul / Gemm / Conv (dynamic, weight-only), every Gemm /
    MatMul / Conv (static: activation-activation matmuls too)."""
    if precision == "int8-static":
        return [n.name for n in model.graph.node if n.op_type in qo.STATIC_OP_TYPES]
    return qo.weighted_nodes(model, ("Gemm", "MatMul", "Conv"))


def group_scores(
    model: onnx.ModelProto,
    precision: str,
    quantize,
    opts: qo.QuantOptions,
    reference: list,
    feeds: list[dict],
    threads: int | None = None,
) -> tuple[dict[str, list[str]], dict[str, float]]:
    """The quantizable nodes by group (qo.node_groups), and each group's output PSNR against fp32 on `feeds` when it
    alone is quantized (everything else float)."""
    candidates = [n for n in quantizable_nodes(model, precision) if n not in opts.exclude]
    groups = qo.node_groups(candidates)
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / "trial.onnx"
        for key, nodes in groups.items():
            others = {n: "sensitivity-trial" for n in candidates if n not in set(nodes)}
            quantize({**opts.exclude, **others}, trial)
            scores[key] = round(qo.output_psnr(reference, qo.run_feeds(trial, feeds, threads)), 2)
    return groups, scores


def sensitivity_pass(
    model: onnx.ModelProto,
    precision: str,
    quantize,
    opts: qo.QuantOptions,
    reference: list,
    feeds: list[dict],
    gate_db: float,
    threads: int | None = None,
) -> dict:
    """Quantize one node group at a time (everything else float), measure its PSNR against fp32 on recorded
    inputs, then exclude groups worst-first until the whole quantized model reaches gate + margin."""
    groups, scores = group_scores(model, precision, quantize, opts, reference, feeds, threads)
    order = sorted(groups, key=lambda k: scores[k])
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / "trial.onnx"
        target = gate_db + SENSITIVITY_MARGIN_DB
        limit = max(1, int(len(groups) * SENSITIVITY_MAX_FRACTION))
        excluded: list[str] = []
        quantize(opts.exclude, trial)
        whole = qo.output_psnr(reference, qo.run_feeds(trial, feeds, threads))
        history = [round(whole, 2)]
        while whole < target and len(excluded) < min(limit, len(order)):
            excluded.append(order[len(excluded)])
            skip = {n: "sensitivity" for g in excluded for n in groups[g]}
            quantize({**opts.exclude, **skip}, trial)
            whole = qo.output_psnr(reference, qo.run_feeds(trial, feeds, threads))
            history.append(round(whole, 2))
    return {
        "target_psnr_db": target,
        "group_psnr_db": dict(sorted(scores.items(), key=lambda kv: kv[1])),
        "excluded_groups": excluded,
        "excluded_nodes": [n for g in excluded for n in groups[g]],
        "psnr_db_after_each_exclusion": history,
    }
