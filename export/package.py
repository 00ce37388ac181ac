"""`edit-mobile export`: a preset or diffusers folder -> an artifact package (docs/package.md), atomically."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..models.convert import load_pipeline, pipeline_family
from ..runtime.atomic import check_output_free
from ..runtime.errors import UserError
from ..runtime.io_specs import TensorSpec
from ..runtime.manifest import TARGETS, ComponentEntry, Manifest, SchedulerEntry, TokenizerEntry, VaeConfig
from ..runtime.package import installed_version, parse_resolution
from .components import ComponentSpec, pipeline_components
from .onnx_export import OPSET, export_onnx, onnx_parity
from .package_writer import write_package

logger = logging.getLogger(__name__)


def tool_versions() -> dict:
    names = ["edit-mobile", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "coremltools", "numpy"]
    return {name: installed_version(name) for name in names}


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


def export_package(
    src: str,
    out: str | Path,
    target: str = "onnx",
    resolution: str | int = 512,
    batch: int = 2,
    max_text_tokens: int | None = None,
    overwrite: bool = False,
    compute_precision: str | None = None,
    deployment_target: str | None = None,
) -> dict:
    """Export every component of the pipeline in `src`; returns the manifest.

    `compute_precision` (fp16 | fp32, default fp16) and `deployment_target` (iOS17 | iOS18 | macOS14 | macOS15,
    default iOS17) apply to target "coreml" only."""
    if target not in TARGETS:
        raise UserError(f"unknown --target {target!r}; expected one of {', '.join(TARGETS)}")
    if target == "coreml":
        from .coreml_export import check_options

        compute_precision, deployment_target = compute_precision or "fp16", deployment_target or "iOS17"
        check_options(compute_precision, deployment_target)
    elif compute_precision is not None or deployment_target is not None:
        raise UserError(
            "--compute-precision and --deployment-target apply to --target coreml only "
            "(ONNX packages get fp16 / int8 from `edit-mobile quantize`)"
        )
    if batch not in (1, 2):
        raise UserError(f"--batch must be 1 or 2, got {batch}")
    if max_text_tokens is not None and max_text_tokens < 1:
        raise UserError(f"--max-text-tokens must be positive, got {max_text_tokens}")
    height, width = parse_resolution(resolution)
    check_output_free(out, overwrite)
    pipe = load_pipeline(src)
    family = pipeline_family(pipe)
    specs = pipeline_components(pipe, family, (height, width), batch, max_text_tokens)
    vae = pipe.vae.config
    manifest = Manifest(
        source=str(src),
        family=family,
        architecture=type(pipe.transformer).__name__,
        edit_config=pipe.transformer.edit.to_dict() if hasattr(pipe.transformer, "edit") else None,
        target=target,
        resolution=(height, width),
        batch=batch,
        latent_shape=tuple(next(s for s in specs if s.name == "vae_decoder").inputs[0].shape[1:]),
        vae=VaeConfig(scaling_factor=vae.scaling_factor, shift_factor=vae.get("shift_factor")),
        transformer_out_channels=pipe.transformer.config.out_channels,
        text={},
        scheduler=SchedulerEntry(path="scheduler/scheduler_config.json"),
        components={},
        export={},
        tools=tool_versions(),
    )
    with write_package(out, overwrite=overwrite) as writer:
        tmp = writer.root
        model_paths = []
        for spec in tqdm(specs, desc="export", unit="component"):
            start = time.perf_counter()
            if target == "coreml":
                path, entry, export_info = _export_coreml_component(
                    spec, tmp, manifest, compute_precision, deployment_target
                )
                model_paths.append(path)
                manifest.components[spec.name] = entry
                manifest.export[spec.name] = {"seconds": round(time.perf_counter() - start, 2), **export_info}
                _save_tokenizer(pipe, spec, tmp, manifest)
                continue
            path = export_onnx(spec, tmp / spec.name)
            parity = onnx_parity(spec, path)
            seconds = time.perf_counter() - start
            if target == "ort-mobile":
                path = convert_to_ort(path)
            model_paths.append(path)
            manifest.components[spec.name] = _entry(spec, path.relative_to(tmp), precision="fp32", opset=OPSET)
            manifest.export[spec.name] = {"seconds": round(seconds, 2), "onnx_vs_torch_max_abs": parity}
            _save_tokenizer(pipe, spec, tmp, manifest)
        pipe.scheduler.save_config(tmp / "scheduler")
        if target == "ort-mobile":
            write_reduced_operator_config(tmp, model_paths)
        manifest = writer.finish(manifest)  # every file's sha256, manifest.json last
    return manifest.to_dict()


def _entry(spec: ComponentSpec, rel: Path, **fields) -> ComponentEntry:
    """The manifest entry of an exported component (its `files` are filled in by the package writer)."""

    def specs(tensors) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(name=t.name, shape=tuple(t.shape), dtype=t.dtype) for t in tensors)

    return ComponentEntry(path=rel.as_posix(), inputs=specs(spec.inputs), outputs=specs(spec.outputs), **fields)


def _save_tokenizer(pipe, spec, tmp: Path, manifest: Manifest) -> None:
    if "tokenizer" in spec.extra:
        tok_name = spec.extra["tokenizer"]
        tokenizer = getattr(pipe, tok_name)
        tokenizer.save_pretrained(tmp / tok_name)
        manifest.text[tok_name] = TokenizerEntry(
            path=tok_name,
            max_length=spec.extra["max_length"],
            pad_id=tokenizer.pad_token_id,
            component=spec.name,
        )


def _export_coreml_component(spec, tmp: Path, manifest: Manifest, compute_precision: str, deployment_target: str):
    """model.mlpackage for one component, checked against PyTorch in the numpy reference executor."""
    from ..runtime.coreml_reference import CoreMLReferenceProgram
    from .coreml_export import coreml_parity, export_coreml, package_size

    start = time.perf_counter()
    path = export_coreml(
        spec,
        tmp / spec.name,
        compute_precision,
        deployment_target,
        metadata={"source": manifest.source, "architecture": manifest.architecture},
    )
    convert_seconds = time.perf_counter() - start
    parity = coreml_parity(spec, path, compute_precision)
    entry = _entry(spec, path.relative_to(tmp), precision=compute_precision, deployment_target=deployment_target)
    twin = json.loads(CoreMLReferenceProgram(path).metadata()["user_defined"].get("edit_mobile.ane_twin", "null"))
    info = {
        "convert_seconds": round(convert_seconds, 2),
        "bytes": package_size(path),
        "ane_twin": twin,
        "coreml_reference_vs_torch": parity,
    }
    return path, entry, info
