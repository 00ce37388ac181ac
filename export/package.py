"""`edit-mobile export`: a preset or diffusers folder -> an artifact package (docs/package.md), atomically."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..models.convert import load_pipeline, pipeline_family
from ..runtime.atomic import atomic_output_dir, check_output_free
from ..runtime.errors import UserError
from ..runtime.package import SCHEMA_VERSION, installed_version, parse_resolution, sha256_file
from .components import pipeline_components
from .onnx_export import OPSET, export_onnx, onnx_parity

logger = logging.getLogger(__name__)

TARGETS = ("onnx", "ort-mobile", "coreml")


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
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": str(src),
        "family": family,
        "architecture": type(pipe.transformer).__name__,
        "edit_config": pipe.transformer.edit.to_dict() if hasattr(pipe.transformer, "edit") else None,
        "target": target,
        "resolution": [height, width],
        "batch": batch,
        "latent_shape": list(next(s for s in specs if s.name == "vae_decoder").inputs[0].shape[1:]),
        "vae": {"scaling_factor": vae.scaling_factor, "shift_factor": vae.get("shift_factor")},
        "transformer_out_channels": pipe.transformer.config.out_channels,
        "text": {},
        "scheduler": {"path": "scheduler/scheduler_config.json"},
        "components": {},
        "export": {},
        "tools": tool_versions(),
        "validation": None,
    }
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model_paths = []
        for spec in tqdm(specs, desc="export", unit="component"):
            start = time.perf_counter()
            if target == "coreml":
                path, entry, export_info = _export_coreml_component(
                    spec, tmp, manifest, compute_precision, deployment_target
                )
                model_paths.append(path)
                manifest["components"][spec.name] = entry
                manifest["export"][spec.name] = {"seconds": round(time.perf_counter() - start, 2), **export_info}
                _save_tokenizer(pipe, spec, tmp, manifest)
                continue
            path = export_onnx(spec, tmp / spec.name)
            parity = onnx_parity(spec, path)
            seconds = time.perf_counter() - start
            if target == "ort-mobile":
                path = convert_to_ort(path)
            model_paths.append(path)
            manifest["components"][spec.name] = {
                "path": str(path.relative_to(tmp)),
                "precision": "fp32",
                "opset": OPSET,
                **spec.io_dict(),
            }
            manifest["export"][spec.name] = {"seconds": round(seconds, 2), "onnx_vs_torch_max_abs": parity}
            _save_tokenizer(pipe, spec, tmp, manifest)
        pipe.scheduler.save_config(tmp / "scheduler")
        if target == "ort-mobile":
            write_reduced_operator_config(tmp, model_paths)
        for name, entry in manifest["components"].items():
            # rglob: a Core ML .mlpackage is a folder; every file inside it is listed and hashed
            entry["files"] = {
                str(f.relative_to(tmp)): sha256_file(f) for f in sorted((tmp / name).rglob("*")) if f.is_file()
            }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _save_tokenizer(pipe, spec, tmp: Path, manifest: dict) -> None:
    if "tokenizer" in spec.extra:
        tok_name = spec.extra["tokenizer"]
        tokenizer = getattr(pipe, tok_name)
        tokenizer.save_pretrained(tmp / tok_name)
        manifest["text"][tok_name] = {
            "path": tok_name,
            "max_length": spec.extra["max_length"],
            "pad_id": tokenizer.pad_token_id,
            "component": spec.name,
        }


def _export_coreml_component(spec, tmp: Path, manifest: dict, compute_precision: str, deployment_target: str):
    """model.mlpackage for one component, checked against PyTorch in the numpy reference executor."""
    from ..runtime.coreml_reference import CoreMLReferenceProgram
    from .coreml_export import coreml_parity, export_coreml, package_size

    start = time.perf_counter()
    path = export_coreml(
        spec,
        tmp / spec.name,
        compute_precision,
        deployment_target,
        metadata={"source": manifest["source"], "architecture": manifest["architecture"]},
    )
    convert_seconds = time.perf_counter() - start
    parity = coreml_parity(spec, path, compute_precision)
    entry = {
        "path": str(path.relative_to(tmp)),
        "precision": compute_precision,
        "deployment_target": deployment_target,
        **spec.io_dict(),
    }
    twin = json.loads(CoreMLReferenceProgram(path).metadata()["user_defined"].get("edit_mobile.ane_twin", "null"))
    info = {
        "convert_seconds": round(convert_seconds, 2),
        "bytes": package_size(path),
        "ane_twin": twin,
        "coreml_reference_vs_torch": parity,
    }
    return path, entry, info
