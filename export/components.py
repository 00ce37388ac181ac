"""Export specs: for each component of a text-to-image pipeline, an export-friendly torch module with positional
inputs, and its static input / output specs (names, shapes, dtypes) as in docs/package.md.

Which components a family has, their lengths and the transformer's conditioning inputs come from the family
registry (runtime/families.py, models/families.py); text encoders are built by kind (T5, CLIP)."""

from __future__ import annotations

import numpy as np
from torch import nn

from ..models.families import PixArtTransformer, SD3Transformer, TorchFamily, torch_family
from ..models.transformer_chunks import plan_blocks
from ..runtime.errors import UserError
from ..runtime.families import Family, TextEncoder
from ..runtime.families import family as family_spec
from ..runtime.io_specs import to_numpy_dtype
from ..runtime.tiling import Tiling
from ..runtime.tokenizer import Encoding
from .specs import ComponentSpec, TensorSpec
from .t5_chunks import ModuleParts, t5_bytes, t5_chunk_specs

# The transformer's export wrappers live with their family (models/families.py); named here for the studies.
__all__ = ["ComponentSpec", "PixArtTransformer", "SD3Transformer", "TensorSpec", "pipeline_components"]


class T5Encoder(nn.Module):
    def __init__(self, encoder, with_mask: bool):
        super().__init__()
        self.encoder, self.with_mask = encoder, with_mask

    def forward(self, input_ids, attention_mask=None):  # (1, T) -> (1, T, D)
        return self.encoder(input_ids, attention_mask=attention_mask if self.with_mask else None)[0]


class ClipEncoder(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):  # (1, 77) -> penultimate hidden states (1, 77, D), projected pooled (1, P)
        out = self.encoder(input_ids, output_hidden_states=True)
        return out.hidden_states[-2], out[0]  # as StableDiffusion3Pipeline._get_clip_prompt_embeds (clip_skip=None)


class VaeDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):  # unscaled latents (1, C, h, w) -> image (1, 3, H, W) in [-1, 1]
        return self.vae.decode(latent_sample, return_dict=False)[0]


class VaeEncoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, sample):  # image (1, 3, H, W) in [-1, 1] -> latent mean (1, C, h, w), unscaled
        return self.vae.encode(sample).latent_dist.mean


def _f32(name, *shape):
    return TensorSpec(name, tuple(shape), "float32")


def _i64(name, *shape):
    return TensorSpec(name, tuple(shape), "int64")


# Text encoder graphs by kind (runtime/families.py: TextEncoder.kind): (wrapper, output specs from the config).
def _t5(enc, spec: TextEncoder, length: int) -> tuple[nn.Module, list[TensorSpec]]:
    d = enc.config.d_model
    return T5Encoder(enc, with_mask="attention_mask" in spec.inputs), [_f32("last_hidden_state", 1, length, d)]


def _clip(enc, spec: TextEncoder, length: int) -> tuple[nn.Module, list[TensorSpec]]:
    d, p = enc.config.hidden_size, enc.config.projection_dim
    return ClipEncoder(enc), [_f32("hidden_states", 1, length, d), _f32("text_embeds", 1, p)]


TEXT_ENCODER_KINDS = {"t5": _t5, "clip": _clip}


def text_encoder_component(
    pipe, spec: TextEncoder, max_text_tokens: int | None, max_component_mb: float | None = None, parts=None
) -> ComponentSpec:
    """One text encoder at its static length: the family's default (T5; `max_text_tokens` overrides it) or the
    tokenizer's own (CLIP's 77). A T5 whose fp32 weights exceed `max_component_mb` becomes a chain of graphs within
    that size (export/t5_chunks.py), read from `parts` (a folder the pipeline did not load) or from the pipeline's
    own encoder."""
    if spec.max_length is None:
        length = getattr(pipe, spec.tokenizer).model_max_length
    else:
        length = max_text_tokens or spec.max_length
    extra = {"tokenizer": spec.tokenizer, "max_length": length}
    inputs = [_i64(name, 1, length) for name in spec.inputs]
    if spec.kind == "t5" and max_component_mb is not None:
        parts = parts or ModuleParts(getattr(pipe, spec.component))
        if t5_bytes(parts.config) > max_component_mb * 2**20:
            chunks = t5_chunk_specs(parts, spec.component, length, "attention_mask" in spec.inputs, max_component_mb)
            outputs = [_f32("last_hidden_state", 1, length, parts.config.d_model)]
            return ComponentSpec(spec.component, None, inputs, outputs, extra, chunks=chunks)
    module, outputs = TEXT_ENCODER_KINDS[spec.kind](getattr(pipe, spec.component), spec, length)
    return ComponentSpec(spec.component, module, inputs, outputs, extra)


def conditioning_specs(family: Family, text_encoders: list[ComponentSpec], batch: int) -> list[TensorSpec]:
    """The transformer's conditioning inputs at `batch`: the family's own combination of its text encoders'
    outputs (runtime/families.py, `Family.combine`, the very function the runtime runs) applied to zeros of the
    encoders' static shapes, so that the exported graph takes exactly what the runtime will feed it."""
    encoded = {}
    for spec in text_encoders:
        ids = np.zeros(next(s.shape for s in spec.inputs if s.name == "input_ids"), np.int64)
        outputs = {s.name: np.zeros(s.shape, to_numpy_dtype(s.dtype)) for s in spec.outputs}
        encoded[spec.name] = (Encoding(ids, np.zeros_like(ids)), outputs)
    combined = family.combine(encoded)
    return [_f32(name, batch, *combined[name].shape[1:]) for name in family.conditioning]


def transformer_component(
    transformer,
    torch_spec: TorchFamily,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    chunks: int | None = None,
    max_component_mb: float | None = None,
) -> ComponentSpec:
    """The transformer as one graph, or as a chain of graphs split at block boundaries (models/transformer_chunks.py):
    `chunks` of them, or as many as keep each within `max_component_mb` of fp32 weights. Either way the traced
    modules run the diffusers forward block by block, equal to it bit for bit (`transformer_graph`,
    `transformer_chunk`)."""
    if chunks is None and max_component_mb is None:
        plan = [range(len(transformer.transformer_blocks))]
    else:
        try:
            plan = plan_blocks(transformer, chunks, max_component_mb)
        except ValueError as e:
            raise UserError(f"--transformer-chunks: {e}") from None
    sample_hw = inputs[0].shape[2:]
    if len(plan) == 1:
        module = torch_spec.transformer_graph(transformer, sample_hw).eval()
        return ComponentSpec("transformer", module, inputs, outputs)
    by_name = {s.name: s for s in inputs + outputs}
    text_tokens = by_name["encoder_hidden_states"].shape[1]

    def builder(k: int, blocks: range):
        def build() -> ComponentSpec:
            module = torch_spec.transformer_chunk(transformer, blocks, k == 0, k == len(plan) - 1, sample_hw)

            def spec(name: str) -> TensorSpec:
                return by_name.get(name) or _f32(name, *module.value_shape(name, inputs[0].shape[0], text_tokens))

            ins, outs = [spec(n) for n in module.input_names], [spec(n) for n in module.output_names]
            return ComponentSpec(f"transformer.chunk-{k:02d}", module.eval(), ins, outs, {"blocks": list(blocks)})

        return build

    return ComponentSpec("transformer", None, inputs, outputs, chunks=[builder(k, b) for k, b in enumerate(plan)])


def vae_tilings(tile_px: int, factor: int, resolution: tuple[int, int]) -> tuple[Tiling, Tiling]:
    """The VAE decoder's and encoder's tilings for square tiles of `tile_px` pixels overlapping by a quarter, as
    diffusers' `enable_tiling` (runtime/tiling.py); the encoder's tiles start on whole latents."""
    if tile_px % (4 * factor) or tile_px > min(resolution) or tile_px >= max(resolution):
        raise UserError(
            f"--vae-tile {tile_px} must be a multiple of {4 * factor} (4 x the VAE's {factor}x downsampling), at most "
            f"the image's shorter side and less than its longer side ({resolution[0]}x{resolution[1]})"
        )
    latent = tile_px // factor
    overlap = latent // 4
    return Tiling((latent, latent), overlap), Tiling((tile_px, tile_px), overlap * factor, align=factor)


def pipeline_components(
    pipe,
    family: str,
    resolution: tuple[int, int],
    batch: int,
    max_text_tokens: int | None,
    max_component_mb: float | None = None,
    streamed: dict | None = None,
    transformer_chunks: int | None = None,
    vae_tile: int | None = None,
) -> list[ComponentSpec]:
    """Every component the runtime's loop needs, with static shapes for this resolution and batch: the family's
    text encoders and transformer (runtime/families.py, models/families.py), the VAE decoder and encoder.
    `streamed`: {text encoder: T5 parts} for encoders the pipeline did not load (export/t5_chunks.py).
    `transformer_chunks` / `max_component_mb`: the transformer as a chain of graphs (`transformer_component`).
    `vae_tile`: the VAE's graphs take square tiles of this many pixels (`vae_tilings`)."""
    spec, torch_spec = family_spec(family), torch_family(family)
    height, width = resolution
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    patch = pipe.transformer.config.patch_size
    if height % (factor * patch) or width % (factor * patch):
        raise UserError(
            f"--resolution {width}x{height}: both sides must be multiples of {factor * patch} for this model"
        )
    grid = torch_spec.max_latent_grid(pipe.transformer.config)
    if grid and max(height, width) > grid * factor * patch:  # SD3 crops its position table to the token grid
        raise UserError(
            f"--resolution {width}x{height}: this model's position embeddings cover {grid}x{grid} patches, at most "
            f"{grid * factor * patch} pixels a side"
        )
    if pipe.transformer.config.get("use_additional_conditions") or getattr(
        pipe.transformer, "use_additional_conditions", False
    ):
        raise UserError(f"{spec.title} models with additional (resolution / aspect) conditions are not supported")
    c_lat, h, w = pipe.vae.config.latent_channels, height // factor, width // factor
    decoder_tiling, encoder_tiling = vae_tilings(vae_tile, factor, resolution) if vae_tile else (None, None)
    streamed = streamed or {}
    specs = [
        text_encoder_component(pipe, enc, max_text_tokens, max_component_mb, streamed.get(enc.component))
        for enc in spec.text_encoders
    ]
    specs.append(
        transformer_component(
            pipe.transformer,
            torch_spec,
            [_f32("sample", batch, c_lat, h, w), _f32("timestep", batch), *conditioning_specs(spec, specs, batch)],
            [_f32("out_sample", batch, pipe.transformer.config.out_channels, h, w)],
            transformer_chunks,
            max_component_mb,
        )
    )
    specs.append(
        ComponentSpec(
            "vae_decoder",
            VaeDecoder(pipe.vae),
            [_f32("latent_sample", 1, c_lat, h, w)],
            [_f32("sample", 1, 3, height, width)],
            tiling=decoder_tiling,
        )
    )
    specs.append(
        ComponentSpec(
            "vae_encoder",
            VaeEncoder(pipe.vae),
            [_f32("sample", 1, 3, height, width)],
            [_f32("latent_mean", 1, c_lat, h, w)],
            tiling=encoder_tiling,
        )
    )
    return specs
