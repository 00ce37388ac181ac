"""`edit-mobile export`: a preset or diffusers folder -> an artifact package (docs/package.md), atomically."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

from ..models.convert import load_pipeline, pipeline_family
from ..runtime.atomic import check_output_free
from ..runtime.errors import UserError
from ..runtime.manifest import Manifest, SchedulerEntry, TokenizerEntry, VaeConfig
from ..runtime.package import installed_version, parse_resolution
from .components import pipeline_components
from .package_writer import write_package
from .t5_chunks import streamed_t5_parts
from .targets import convert_to_ort, export_target, write_reduced_operator_config

__all__ = ["convert_to_ort", "export_package", "tool_versions", "write_reduced_operator_config"]

logger = logging.getLogger(__name__)


def tool_versions() -> dict:
    names = ["edit-mobile", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "coremltools", "numpy"]
    return {name: installed_version(name) for name in names}


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
    max_component_mb: float | None = None,
    transformer_chunks: int | None = None,
    vae_tile: int | None = None,
) -> dict:
    """Export every component of the pipeline in `src`; returns the manifest.

    `compute_precision` (fp16 | fp32, default fp16) and `deployment_target` (iOS17 | iOS18 | macOS14 | macOS15,
    default iOS17) apply to target "coreml" only: each target takes its own options (export/targets.py).
    `max_component_mb`: a T5 text encoder or transformer with more fp32 weights than this is exported as a chain of
    graphs within it, built one chunk at a time (a T5 from a folder is never loaded whole; export/t5_chunks.py).
    `transformer_chunks`: the transformer as that many graphs, split at block boundaries
    (models/transformer_chunks.py). `vae_tile`: the VAE decoder and encoder graphs take square tiles of this many
    pixels, and the runtime runs them tile by tile with blended overlaps (runtime/tiling.py)."""
    exporter = export_target(target)
    options = exporter.resolve_options(compute_precision=compute_precision, deployment_target=deployment_target)
    if batch not in (1, 2):
        raise UserError(f"--batch must be 1 or 2, got {batch}")
    if max_text_tokens is not None and max_text_tokens < 1:
        raise UserError(f"--max-text-tokens must be positive, got {max_text_tokens}")
    if max_component_mb is not None and not max_component_mb > 0:
        raise UserError(f"--max-component-mb must be positive, got {max_component_mb}")
    height, width = parse_resolution(resolution)
    check_output_free(out, overwrite)
    streamed = streamed_t5_parts(str(src), max_component_mb)
    pipe = load_pipeline(src, skip=tuple(streamed))
    family = pipeline_family(pipe)
    specs = pipeline_components(
        pipe, family, (height, width), batch, max_text_tokens, max_component_mb, streamed, transformer_chunks, vae_tile
    )
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
            exported = exporter.export_component(spec, tmp, manifest, options)
            model_paths += [tmp / rel for rel in exported.entry.model_paths]
            manifest.components[spec.name] = exported.entry
            manifest.export[spec.name] = exported.info
            _save_tokenizer(pipe, spec, tmp, manifest)
        pipe.scheduler.save_config(tmp / "scheduler")
        exporter.finish(tmp, model_paths)
        manifest = writer.finish(manifest)  # every file's sha256, manifest.json last
    return manifest.to_dict()


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
