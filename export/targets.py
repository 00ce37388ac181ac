"""Export targets (`edit-mobile export --target`), one small object each, chosen by name from `EXPORT_TARGETS`.

A target says which options it takes (with their defaults), how one component becomes model files plus its
manifest entry, what it writes once all components are exported, and how the CLI summarises the result:

  options                     {option: default} (Core ML: compute_precision fp16, deployment_target iOS17)
  resolve_options(**given)    the options with defaults filled in; UserError for an option of another target or a
                              bad value (before anything is loaded or written)
  export_component(spec, root, manifest, options) -> ExportedComponent
                              the component's files under root/<name>/, its ComponentEntry (the package writer
                              fills in `files`) and its manifest `export` record
  finish(root, model_paths)   after the last component (ort-mobile: required_operators.config)
  summary(manifest, out)      the line `edit-mobile export` prints

`export_package` (export/package.py) runs one loop for every target, writing through the one package writer.
Adding a target: one class here, registered in EXPORT_TARGETS, plus its name in runtime/manifest.py's TARGETS.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..runtime.errors import UserError
from ..runtime.io_specs import TensorSpec
from ..runtime.manifest import TARGETS, ChunkEntry, ComponentEntry, Manifest, size_key

if TYPE_CHECKING:  # torch-free at run time: `quantize` imports the targets and must not load torch
    from .components import ComponentSpec


@dataclass
class ExportedComponent:
    path: Path  # the model file (or .mlpackage folder) the runtime opens
    entry: ComponentEntry  # its manifest entry, `files` still empty
    info: dict  # its manifest `export` record ("seconds" first)


def _specs(tensors) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(name=t.name, shape=tuple(t.shape), dtype=t.dtype) for t in tensors)


def component_entry(spec: ComponentSpec, rel: Path, **fields) -> ComponentEntry:
    """The manifest entry of an exported component (its `files` are filled in by the package writer)."""
    return ComponentEntry(path=rel.as_posix(), inputs=_specs(spec.inputs), outputs=_specs(spec.outputs), **fields)


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def merge_sizes(manifest: Manifest, root: Path, filename: str, merge) -> dict:
    """Every size-dependent component's graphs of all sizes as one program per folder (the component's, or each
    chunk's of a chunked component): `merge({"image_WxH": that size's file, ...}, folder / filename)` writes it and
    returns its record. The manifest entries then name the merged file and their function. Returns the records by
    folder."""
    merged = {}
    for name in {n for s in manifest.sizes.values() for n in s.components}:
        entries = {size_key(manifest.resolution): manifest.components[name]}
        entries.update({key: s.components[name] for key, s in manifest.sizes.items() if name in s.components})
        for i, rel in enumerate(entries[size_key(manifest.resolution)].model_paths):
            functions = {f"image_{key}": root / e.model_paths[i] for key, e in entries.items()}
            merged[posixpath.dirname(rel)] = merge(functions, root / posixpath.dirname(rel) / filename)
        for key, entry in entries.items():
            paths = [f"{posixpath.dirname(rel)}/{filename}" for rel in entry.model_paths]
            entry.path, entry.function = paths[0], f"image_{key}"
            entry.chunks = tuple(replace(c, path=rel) for c, rel in zip(entry.chunks, paths))
    return merged


class ExportTarget:
    """Base: no options, nothing to finish."""

    name: str = ""
    options: dict[str, str] = {}
    options_note = ""  # appended to the error for an option this target does not take
    combine_each_size = False  # combine_sizes after every further size (it extends what it combined before)

    def resolve_options(self, **given) -> dict:
        foreign = [k for k, v in given.items() if v is not None and k not in self.options]
        if foreign:
            owners = [t for t in EXPORT_TARGETS.values() if any(k in t.options for k in foreign)]
            flags = [_flag(k) for k in foreign]  # the flags given, not every flag of their target
            verb = "apply" if len(flags) > 1 else "applies"
            raise UserError(
                f"{' and '.join(flags)} {verb} to --target {', '.join(t.name for t in owners)} only{self.options_note}"
            )
        return {k: given.get(k) if given.get(k) is not None else default for k, default in self.options.items()}

    def export_component(
        self, spec: ComponentSpec, root: Path, manifest: Manifest, options: dict, stem: str = "model"
    ) -> ExportedComponent:
        """`stem`: the model file's name without suffix (a multi-size package's further sizes: model_WxH).
        `options`: the target's own (`resolve_options`) and `multi_size`, the components exported at several sizes."""
        raise NotImplementedError

    def finish(self, root: Path, model_paths: list[Path]) -> None:
        """Called once after every component is exported."""

    def combine_sizes(self, manifest: Manifest, root: Path, options: dict) -> dict:
        """A multi-size package, after every size is exported: store each component's weights once for all its
        sizes' graphs (rewriting the manifest entries as needed); returns the manifest's `export.sizes` record."""
        raise NotImplementedError

    def summary(self, manifest: dict, out) -> str:
        raise NotImplementedError


class OnnxTarget(ExportTarget):
    """model.onnx per component (opset 17, static shapes), checked against PyTorch in ONNX Runtime.

    Option `graph`: "fused" (default) exports the transformer's softmax attention as ONNX Runtime's fused
    MultiHeadAttention and runs ONNX Runtime's transformer optimizer on it (export/mha.py; the fastest graph the
    scaling study measured, docs/benchmarks.md); "plain" keeps every node a standard ONNX op (portable to any ONNX
    runtime and execution provider). Text encoders and the VAE are exported plain either way."""

    name = "onnx"
    options = {"graph": "fused"}
    GRAPHS = ("fused", "plain")
    combine_each_size = True
    options_note = " (ONNX packages get fp16 / int8 from `edit-mobile quantize`)"

    def resolve_options(self, **given) -> dict:
        options = super().resolve_options(**given)
        if options["graph"] not in self.GRAPHS:
            raise UserError(f"--graph {options['graph']!r}: choose one of {', '.join(self.GRAPHS)}")
        return options

    @staticmethod
    def fused(spec, options) -> bool:
        return options["graph"] == "fused" and spec.name == "transformer"

    def export_component(self, spec, root, manifest, options, stem="model") -> ExportedComponent:
        from .onnx_export import OPSET, export_onnx, onnx_parity

        start = time.perf_counter()
        if spec.chunks:
            return self._export_chunks(spec, root, start, stem, self.fused(spec, options))
        graph = spec.graph()
        path = export_onnx(graph, root / spec.name, stem=stem, fused=self.fused(spec, options))
        parity = onnx_parity(graph, path)
        seconds = time.perf_counter() - start
        info = {"seconds": round(seconds, 2), "onnx_vs_torch_max_abs": parity, **fused_ops([path])}
        path = self.convert(path)
        entry = component_entry(spec, path.relative_to(root), precision="fp32", opset=OPSET, tiling=spec.tiling)
        return ExportedComponent(path, entry, info)

    def _export_chunks(self, spec, root, start: float, stem: str, fused: bool) -> ExportedComponent:
        """A chunked component: each chunk's weights are built, exported to <name>/chunk-NN/, checked against its
        PyTorch module and released before the next one (peak memory: one chunk)."""
        from .onnx_export import OPSET, export_onnx, onnx_parity

        chunks, parity, paths = [], {}, []
        for k, build in enumerate(spec.chunks):
            chunk = build()
            path = export_onnx(chunk, root / spec.name / f"chunk-{k:02d}", stem=stem, fused=fused)
            paths.append(path)
            parity.update({f"chunk-{k:02d}.{out}": v for out, v in onnx_parity(chunk, path).items()})
            path = self.convert(path)
            chunks.append(ChunkEntry(path.relative_to(root).as_posix(), _specs(chunk.inputs), _specs(chunk.outputs)))
            del chunk
        entry = component_entry(spec, Path(chunks[0].path), precision="fp32", opset=OPSET, chunks=tuple(chunks))
        seconds = round(time.perf_counter() - start, 2)
        info = {"seconds": seconds, "chunks": len(chunks), "onnx_vs_torch_max_abs": parity, **fused_ops(paths)}
        return ExportedComponent(root / chunks[0].path, entry, info)

    def convert(self, model_path: Path) -> Path:
        """The file the runtime opens, made from the exported model.onnx (ONNX: model.onnx itself)."""
        return model_path

    def combine_sizes(self, manifest, root, options) -> dict:
        """One weights file per folder that holds graphs of several sizes (a component, or one chunk of a chain;
        export/shared_weights.py). ORT-mobile: the .onnx graphs share, their .ort files keep their own copies."""
        from .shared_weights import share_weights

        by_folder: dict[Path, list[Path]] = {}
        for entry in manifest.all_entries():
            for rel in entry.model_paths:
                path = (root / rel).with_suffix(".onnx")
                by_folder.setdefault(path.parent, []).append(path)
        shared = {f.relative_to(root).as_posix(): share_weights(p) for f, p in by_folder.items() if len(p) > 1}
        return {"weights": "one weights.bin per component folder", "folders": shared}

    def summary(self, manifest, out) -> str:
        worst = max(v for e in manifest["export"].values() for v in e.get("onnx_vs_torch_max_abs", {}).values())
        sizes = [manifest["resolution"], *(s["resolution"] for s in manifest.get("sizes", {}).values())]
        shown = ", ".join(f"{w}x{h}" for h, w in sizes)
        return (
            f"wrote {out}: {len(manifest['components'])} components at {shown}, max |ONNX - PyTorch| on random "
            f"inputs {worst:.2e}"
        )


def fused_ops(paths: list[Path]) -> dict:
    """The manifest's `export` record of ONNX Runtime's fused (com.microsoft) operators in these graphs:
    {"fused_ops": {op: count}}, or {} for plain graphs."""
    import onnx

    ops: dict[str, int] = {}
    for path in paths:
        for node in onnx.load(str(path), load_external_data=False).graph.node:
            if node.domain == "com.microsoft":
                ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"fused_ops": dict(sorted(ops.items()))} if ops else {}


def convert_to_ort(model_path: Path) -> Path:
    """ONNX Runtime's own converter: model.onnx -> model.ort (fixed optimizations, for minimal mobile builds)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle, convert_onnx_models_to_ort

    convert_onnx_models_to_ort(model_path, output_dir=model_path.parent, optimization_styles=[OptimizationStyle.Fixed])
    ort_path = model_path.with_suffix(".ort")
    if not ort_path.is_file():
        raise RuntimeError(f"ONNX Runtime's converter wrote no {ort_path.name}")
    return ort_path


def write_reduced_operator_config(package: Path, model_paths: list[Path]) -> Path:
    """The operator list a minimal ONNX Runtime mobile build needs for these models (--include_ops_by_config)."""
    from onnxruntime.tools.convert_onnx_models_to_ort import create_config_from_models

    config = package / "required_operators.config"
    create_config_from_models(model_paths, config, enable_type_reduction=False)
    return config


class OrtMobileTarget(OnnxTarget):
    """The ONNX export, plus ONNX Runtime's .ort format per component and the operator list of a minimal build."""

    name = "ort-mobile"

    def convert(self, model_path: Path) -> Path:
        return convert_to_ort(model_path)

    def finish(self, root: Path, model_paths: list[Path]) -> None:
        write_reduced_operator_config(root, model_paths)


class CoreMLTarget(ExportTarget):
    """One Core ML ML program (model.mlpackage) per component, checked against PyTorch in the numpy MIL executor."""

    name = "coreml"
    options = {"compute_precision": "fp16", "deployment_target": "iOS17"}
    # Multi-function ML programs (one function per size, weights shared) need these deployment targets or later.
    MULTIFUNCTION_TARGETS = ("iOS18", "macOS15")

    def resolve_options(self, **given) -> dict:
        from .coreml_export import check_options

        options = super().resolve_options(**given)
        check_options(options["compute_precision"], options["deployment_target"])
        return options

    def combine_sizes(self, manifest, root, options) -> dict:
        """iOS18 / macOS15 and later: each size-dependent component becomes one multi-function model.mlpackage
        (function `image_WxH` per size, the default size's the default function; coremltools stores a weight that
        several functions share once). Older targets cannot load multi-function programs: each size keeps its own
        model_WxH.mlpackage, with its own weights."""
        from .coreml_export import package_size, save_multifunction

        if options["deployment_target"] not in self.MULTIFUNCTION_TARGETS:
            return {
                "weights": f"one .mlpackage per size, weights not shared: multi-function programs need "
                f"--deployment-target {' or '.join(self.MULTIFUNCTION_TARGETS)}"
            }

        def merge(functions: dict[str, Path], target: Path) -> dict:
            before = sum(package_size(p) for p in functions.values())
            save_multifunction(functions, next(iter(functions)), target)
            return {"functions": list(functions), "bytes": package_size(target), "bytes_before": before}

        merged = merge_sizes(manifest, root, "model.mlpackage", merge)
        return {"weights": "one multi-function model.mlpackage per component (per chunk)", "components": merged}

    def export_component(self, spec, root, manifest, options, stem="model") -> ExportedComponent:
        start = time.perf_counter()
        precision, deployment_target = options["compute_precision"], options["deployment_target"]
        fields = dict(precision=precision, deployment_target=deployment_target, tiling=spec.tiling)
        if not spec.chunks:
            path, info = self._export_program(spec.graph(), root / spec.name, manifest, options, stem)
            return ExportedComponent(path, component_entry(spec, path.relative_to(root), **fields), info)
        # A chunked component (apple/ml-stable-diffusion's --chunk-unet): one program per chunk, each built,
        # converted, checked against its PyTorch module and released before the next (peak memory: one chunk).
        chunks, records = [], {}
        for k, build in enumerate(spec.chunks):
            chunk = build()
            path, records[f"chunk-{k:02d}"] = self._export_program(
                chunk, root / spec.name / f"chunk-{k:02d}", manifest, options, stem
            )
            chunks.append(ChunkEntry(path.relative_to(root).as_posix(), _specs(chunk.inputs), _specs(chunk.outputs)))
            del chunk
        entry = component_entry(spec, Path(chunks[0].path), chunks=tuple(chunks), **fields)
        parity = [r["coreml_reference_vs_torch"] for r in records.values()]
        info = {
            "seconds": round(time.perf_counter() - start, 2),
            "convert_seconds": round(sum(r["convert_seconds"] for r in records.values()), 2),
            "bytes": sum(r["bytes"] for r in records.values()),
            "chunks": records,
            "coreml_reference_vs_torch": {  # every chunk's outputs, for the summary's worst case
                "gate_db": parity[0]["gate_db"],
                "outputs": {f"{key}.{o}": c for key, p in zip(records, parity) for o, c in p["outputs"].items()},
            },
        }
        return ExportedComponent(root / chunks[0].path, entry, info)

    def _export_program(self, graph, folder: Path, manifest, options, stem: str) -> tuple[Path, dict]:
        """One module as `folder/<stem>.mlpackage`, checked against PyTorch in the reference executor; its path and
        `export` record."""
        from ..runtime.mil import MILProgram
        from .coreml_export import coreml_parity, export_coreml, package_size

        start = time.perf_counter()
        metadata = {"source": manifest.source, "architecture": manifest.architecture}
        precision = options["compute_precision"]
        path = export_coreml(graph, folder, precision, options["deployment_target"], metadata=metadata, stem=stem)
        convert_seconds = time.perf_counter() - start
        parity = coreml_parity(graph, path, precision)
        twin = json.loads(MILProgram(path).metadata()["user_defined"].get("edit_mobile.ane_twin", "null"))
        return path, {
            "seconds": round(time.perf_counter() - start, 2),
            "convert_seconds": round(convert_seconds, 2),
            "bytes": package_size(path),
            "ane_twin": twin,
            "coreml_reference_vs_torch": parity,
        }

    def summary(self, manifest, out) -> str:
        worst = min(
            o["psnr_db"]
            for e in manifest["export"].values()
            for o in e.get("coreml_reference_vs_torch", {"outputs": {}})["outputs"].values()
        )
        return (
            f"wrote {out}: {len(manifest['components'])} Core ML components, worst PSNR of the reference "
            f"executor against PyTorch on random inputs {worst:.1f} dB"
        )


class ExecuTorchTarget(ExportTarget):
    """One ExecuTorch program (model.pte) per component, lowered to XNNPACK by default, checked against PyTorch in
    ExecuTorch's own runtime (export/executorch_export.py)."""

    name = "executorch"
    options = {"delegate": "xnnpack", "precision": None}
    MULTI_METHOD_DELEGATES = ("xnnpack", "portable")  # a multi-size program checked in ExecuTorch's runtime here

    def resolve_options(self, **given) -> dict:
        from .executorch_export import check_delegate, check_precision, import_executorch

        options = super().resolve_options(**given)
        check_delegate(options["delegate"])
        check_precision(options["precision"])
        if options["delegate"] == "coreml" and options["precision"] not in (None, "fp32"):
            raise UserError(
                "--delegate coreml exports fp32 weights in fp16 Core ML programs; for smaller Core ML weights use "
                "--target coreml and `edit-mobile quantize` (Core ML's own compression)"
            )
        import_executorch()  # a one-line error before anything is loaded when the extra is missing
        return options

    def export_component(self, spec, root, manifest, options, stem="model") -> ExportedComponent:
        from ..runtime.manifest import GATES_DB
        from .executorch_export import INT4_BLOCK, combine_delegation, component_precision

        start = time.perf_counter()
        precision = component_precision(spec.name, options["precision"])
        # a component with several sizes keeps its traced programs until combine_sizes lowers them all as one
        keep = spec.name in options.get("multi_size", ()) and options["delegate"] in self.MULTI_METHOD_DELEGATES
        fields = dict(precision=precision, tiling=spec.tiling)
        if precision != "fp32":
            weights = (
                "int8, one scale per output channel" if precision == "int8-dynamic" else f"int4, blocks of {INT4_BLOCK}"
            )
            fields["gate_psnr_db"] = GATES_DB[precision]
            convolutions = (
                "; dense convolutions int8 per output channel, int8 dynamic activations (PT2E, XNNPACKQuantizer)"
                if options["delegate"] == "xnnpack"
                else ""
            )
            fields["quantization"] = {
                "method": f"torchao quantize_ (Int8DynamicActivationIntxWeightConfig): int8 dynamic activations, "
                f"{weights}; linear layers{convolutions}, lowered to {options['delegate']}",
                "source_precision": "fp32",
            }
        if not spec.chunks:
            path, info = self._export_program(spec.graph(), root / spec.name, precision, options, stem, keep)
            info["seconds"] = round(time.perf_counter() - start, 2)
            return ExportedComponent(path, component_entry(spec, path.relative_to(root), **fields), info)
        # A chunked component: one program per chunk, each built, lowered, checked and released before the next.
        chunks, records = [], {}
        for k, build in enumerate(spec.chunks):
            chunk = build()
            folder = root / spec.name / f"chunk-{k:02d}"
            path, records[folder.name] = self._export_program(chunk, folder, precision, options, stem, keep)
            chunks.append(ChunkEntry(path.relative_to(root).as_posix(), _specs(chunk.inputs), _specs(chunk.outputs)))
            del chunk
        entry = component_entry(spec, Path(chunks[0].path), chunks=tuple(chunks), **fields)
        info = {
            "seconds": round(time.perf_counter() - start, 2),
            "delegate": options["delegate"],
            "bytes": sum(r["bytes"] for r in records.values()),
            "delegation": combine_delegation([r["delegation"] for r in records.values()]),
            "chunks": records,
        }
        if all("executorch_vs_torch_max_abs" in r for r in records.values()):  # every chunk's outputs, for summary
            info["executorch_vs_torch_max_abs"] = {
                f"{key}.{o}": v for key, r in records.items() for o, v in r["executorch_vs_torch_max_abs"].items()
            }
        return ExportedComponent(root / chunks[0].path, entry, info)

    @staticmethod
    def _export_program(graph, folder: Path, precision: str, options, stem: str, keep: bool) -> tuple[Path, dict]:
        """One module (quantized to `precision`) as `folder/<stem>.pte`, checked against PyTorch; its path and
        `export` record."""
        from .executorch_export import export_pte, pte_parity, quantized_module

        quantized = replace(graph, module=quantized_module(graph.module, precision))
        path, delegation = export_pte(
            quantized, folder, options["delegate"], stem=stem, keep_program=keep, float_module=graph.module,
            quantize_convolutions=precision != "fp32" and options["delegate"] == "xnnpack",
        )  # fmt: skip
        # against the module exported (the quantized one for a quantized component, whose convolutions export_pte
        # quantizes: their int8 rounding is in the difference), in ExecuTorch's runtime; Core ML programs run on
        # Apple devices only: export_pte checked them with the reference executor instead
        parity = None if options["delegate"] == "coreml" else pte_parity(quantized, path)
        return path, {
            "delegate": options["delegate"],
            "bytes": path.stat().st_size,
            "delegation": delegation,
            **({"executorch_vs_torch_max_abs": parity} if parity is not None else {}),
        }

    def combine_sizes(self, manifest, root, options) -> dict:
        """Each size-dependent component becomes one program with a method per size (`image_WxH`, as Core ML's
        functions), its weights stored once; each method is checked equal to its size's own program first. The Core
        ML delegate keeps one .pte per size: its merged program could not be run here to check it."""
        from .executorch_export import merge_programs

        if options["delegate"] not in self.MULTI_METHOD_DELEGATES:
            return {"weights": f"one .pte per size, weights not shared ({options['delegate']} delegate)"}
        merged = merge_sizes(
            manifest, root, "model.pte", lambda methods, target: merge_programs(methods, target, options["delegate"])
        )
        return {"weights": "one multi-method model.pte per component (per chunk)", "components": merged}

    def summary(self, manifest, out) -> str:
        records = [e for e in manifest["export"].values() if "delegation" in e]
        head = f"wrote {out}: {len(manifest['components'])} ExecuTorch components ({records[0]['delegate']})"
        if records[0]["delegate"] == "coreml":
            reports = [e["delegation"]["coreml_reference_vs_torch"]["outputs"] for e in records]
            worst = min(c["psnr_db"] for r in reports for c in r.values())
            return f"{head}, worst PSNR of Core ML's reference executor vs PyTorch on random inputs {worst:.1f} dB"
        worst = max(v for e in records for v in e["executorch_vs_torch_max_abs"].values())
        return f"{head}, max |ExecuTorch - PyTorch| on random inputs {worst:.2e}"


# Same names and order as runtime/manifest.py's TARGETS (the closed set a manifest may name; a test checks it).
EXPORT_TARGETS: dict[str, ExportTarget] = {
    t.name: t for t in (OnnxTarget(), OrtMobileTarget(), CoreMLTarget(), ExecuTorchTarget())
}


def export_target(name: str) -> ExportTarget:
    """The export target `name`; UserError naming the choices for an unknown one."""
    try:
        return EXPORT_TARGETS[name]
    except KeyError:
        raise UserError(f"unknown --target {name!r}; expected one of {', '.join(TARGETS)}") from None
