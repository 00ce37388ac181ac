"""`edit-mobile export`: a preset or diffusers folder -> an artifact package (docs/package.md), atomically."""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

from ..models.convert import load_pipeline, pipeline_family, trained_text_tokens
from ..models.families import torch_family
from ..runtime.atomic import check_output_free
from ..runtime.binning import classify
from ..runtime.errors import UserError
from ..runtime.manifest import Manifest, SchedulerEntry, SizeEntry, TokenizerEntry, VaeConfig, size_key
from ..runtime.package import installed_version, parse_resolution
from .components import pipeline_components
from .package_writer import write_package
from .t5_chunks import streamed_t5_parts
from .targets import convert_to_ort, export_target, write_reduced_operator_config

__all__ = ["convert_to_ort", "export_package", "tool_versions", "write_reduced_operator_config"]

logger = logging.getLogger(__name__)

# `export --aspect-ratios NAME`: width:height ratios whose nearest buckets of the model's own table are exported.
ASPECT_RATIO_SETS = {"common": ((1, 1), (3, 4), (9, 16), (4, 3), (16, 9))}  # square, two portrait, two landscape


def tool_versions() -> dict:
    names = ["edit-mobile", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "coremltools", "numpy"]
    return {name: installed_version(name) for name in names}


def export_package(
    src: str,
    out: str | Path,
    target: str = "onnx",
    resolution: str | int | list = 512,
    aspect_ratios: str | None = None,
    batch: int = 2,
    max_text_tokens: int | None = None,
    overwrite: bool = False,
    compute_precision: str | None = None,
    deployment_target: str | None = None,
    delegate: str | None = None,
    precision: str | None = None,
    max_component_mb: float | None = None,
    transformer_chunks: int | None = None,
    vae_tile: int | None = None,
    budget_mb: float | None = None,
    graph: str | None = None,
) -> dict:
    """Export every component of the pipeline in `src`; returns the manifest.

    `resolution`: one size or a list ("N" square or "WIDTHxHEIGHT"). With several, the text encoders are exported
    once and the transformer and VAE get one static graph per size, all graphs of a component reading one weights
    file (export/shared_weights.py); the first size is the package's default (manifest `sizes`, docs/package.md).
    `aspect_ratios` (a name of ASPECT_RATIO_SETS) adds the model's own buckets nearest to those ratios (PixArt-Σ).

    `compute_precision` (fp16 | fp32, default fp16) and `deployment_target` (iOS17 | iOS18 | macOS14 | macOS15,
    default iOS17) apply to target "coreml" only, `graph` (fused | plain, default fused) to "onnx" / "ort-mobile" only,
    `delegate` (xnnpack | coreml | portable, default xnnpack) and
    `precision` (int8-dynamic | int4-weights, default fp32) to target "executorch" only: each target takes its own
    options (export/targets.py).
    `max_component_mb`: a T5 text encoder or transformer with more fp32 weights than this is exported as a chain of
    graphs within it, built one chunk at a time (a T5 from a folder is never loaded whole; export/t5_chunks.py).
    `transformer_chunks`: the transformer as that many graphs, split at block boundaries
    (models/transformer_chunks.py). `vae_tile`: the VAE decoder and encoder graphs take square tiles of this many
    pixels, and the runtime runs them tile by tile with blended overlaps (runtime/tiling.py). `budget_mb`: refuse
    (UserError, nothing written) a package whose predicted peak with `--memory low` exceeds it (export/budget.py)."""
    exporter = export_target(target)
    options = exporter.resolve_options(
        compute_precision=compute_precision,
        deployment_target=deployment_target,
        delegate=delegate,
        precision=precision,
        graph=graph,
    )
    if batch not in (1, 2):
        raise UserError(f"--batch must be 1 or 2, got {batch}")
    if max_text_tokens is not None and max_text_tokens < 1:
        raise UserError(f"--max-text-tokens must be positive, got {max_text_tokens}")
    if max_component_mb is not None and not max_component_mb > 0:
        raise UserError(f"--max-component-mb must be positive, got {max_component_mb}")
    sizes = [parse_resolution(r) for r in (resolution if isinstance(resolution, (list, tuple)) else [resolution])]
    if len(set(sizes)) != len(sizes):
        raise UserError(f"--resolution: a size is given twice ({', '.join(size_key(s) for s in sizes)})")
    if aspect_ratios is not None and aspect_ratios not in ASPECT_RATIO_SETS:
        raise UserError(f"unknown --aspect-ratios {aspect_ratios!r}; expected one of {', '.join(ASPECT_RATIO_SETS)}")
    check_output_free(out, overwrite)
    streamed = streamed_t5_parts(str(src), max_component_mb)
    pipe = load_pipeline(src, skip=tuple(streamed))
    max_text_tokens = max_text_tokens or trained_text_tokens(src)  # the length the model was trained at, if known
    family = pipeline_family(pipe)
    bins = torch_family(family).resolution_bins(pipe.transformer.config)
    if aspect_ratios is not None:
        if not bins:
            raise UserError(f"--aspect-ratios: {family} pipelines have no aspect-ratio buckets; give --resolution WxH")
        # W:H ratios -> the buckets diffusers would bin them to, after any --resolution sizes, each once
        sizes = list(dict.fromkeys([*sizes, *(classify(h, w, bins) for w, h in ASPECT_RATIO_SETS[aspect_ratios])]))
    if not sizes:
        raise UserError("no image size: give --resolution or --aspect-ratios")
    (height, width) = sizes[0]

    def components(size: tuple[int, int]):
        args = (batch, max_text_tokens, max_component_mb, streamed, transformer_chunks, vae_tile)
        return pipeline_components(pipe, family, size, *args)

    specs = components(sizes[0])
    # Per further size, the components whose static shapes depend on it (transformer, VAE): graphs of their own.
    more = {
        size: [s for s, first in zip(components(size), specs) if s.io_dict() != first.io_dict()] for size in sizes[1:]
    }
    # what a target may need to know before the first size is exported (ExecuTorch keeps those programs to merge)
    options["multi_size"] = frozenset(s.name for size_specs in more.values() for s in size_specs)
    vae = pipe.vae.config
    manifest = Manifest(
        source=str(src),
        family=family,
        architecture=type(pipe.transformer).__name__,
        edit_config=pipe.transformer.edit.to_dict() if hasattr(pipe.transformer, "edit") else None,
        target=target,
        resolution=(height, width),
        batch=batch,
        latent_shape=_latent_shape(specs),
        vae=VaeConfig(scaling_factor=vae.scaling_factor, shift_factor=vae.get("shift_factor")),
        transformer_out_channels=pipe.transformer.config.out_channels,
        resolution_bins=bins,
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
        for size, size_specs in more.items():
            key = size_key(size)
            entry = SizeEntry(size, _latent_shape(size_specs), {})
            for spec in tqdm(size_specs, desc=f"export {key}", unit="component"):
                exported = exporter.export_component(spec, tmp, manifest, options, stem=f"model_{key}")
                model_paths += [tmp / rel for rel in exported.entry.model_paths]
                entry.components[spec.name] = exported.entry
                manifest.export[f"{spec.name}@{key}"] = exported.info
            manifest.sizes[key] = entry
            if exporter.combine_each_size:  # ONNX: the disk holds the shared weights and one size's, not every size's
                manifest.export["sizes"] = exporter.combine_sizes(manifest, tmp, options)
        if more and not exporter.combine_each_size:  # one copy of the weights for all sizes, the target's way
            manifest.export["sizes"] = exporter.combine_sizes(manifest, tmp, options)
        pipe.scheduler.save_config(tmp / "scheduler")
        exporter.finish(tmp, model_paths)
        manifest = writer.finish(manifest)  # every file's sha256, manifest.json last
        if budget_mb is not None:
            _check_budget(tmp, budget_mb)
    return manifest.to_dict()


def _check_budget(package: Path, budget_mb: float) -> None:
    """UserError naming the largest component and what would shrink it when even the low-memory mode's predicted
    peak exceeds the budget (the package is not written)."""
    from .budget import fits, predict

    prediction = predict(package)
    verdict = fits(prediction, budget_mb)
    if not verdict["low"]:
        peak = max(prediction["low"].values())
        raise UserError(f"predicted peak {peak:.0f} MB with --memory low exceeds --budget-mb {budget_mb:.0f}; "
                        f"{verdict['advice']}")  # fmt: skip
    logger.info("budget %.0f MB: predicted peaks %s", budget_mb, prediction)


def _latent_shape(specs) -> tuple[int, int, int]:
    """(C, h, w) of one latent: the VAE decoder's input."""
    return tuple(next(s for s in specs if s.name == "vae_decoder").inputs[0].shape[1:])


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
