"""Export specs: for each component of a text-to-image pipeline, an export-friendly torch module with positional
inputs, and its static input / output specs (names, shapes, dtypes) as in docs/package.md."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..runtime.errors import UserError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "float32", "int64"

    def example(self, generator: torch.Generator) -> torch.Tensor:
        if self.dtype == "int64":
            return torch.randint(0, 100, self.shape, generator=generator)
        return torch.randn(self.shape, generator=generator)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class ComponentSpec:
    name: str  # folder name in the package: text_encoder, transformer, vae_decoder, ...
    module: nn.Module  # takes the inputs positionally, returns a tensor or a tuple of tensors
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    extra: dict = field(default_factory=dict)  # e.g. tokenizer folder and max length for text encoders

    def io_dict(self) -> dict:
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}


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


class PixArtTransformer(nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask):
        return self.transformer(
            sample,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            encoder_attention_mask=encoder_attention_mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
        )[0]


class SD3Transformer(nn.Module):
    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
        return self.transformer(
            hidden_states=sample,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            return_dict=False,
        )[0]


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


def pipeline_components(
    pipe, family: str, resolution: tuple[int, int], batch: int, max_text_tokens: int | None
) -> list[ComponentSpec]:
    """Every component the runtime's loop needs, with static shapes for this resolution and batch."""
    height, width = resolution
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    patch = pipe.transformer.config.patch_size
    if height % (factor * patch) or width % (factor * patch):
        raise UserError(f"--resolution {height}x{width} must be a multiple of {factor * patch} for this model")
    c_lat, h, w = pipe.vae.config.latent_channels, height // factor, width // factor
    specs = []
    if family == "pixart":
        if pipe.transformer.config.get("use_additional_conditions") or pipe.transformer.use_additional_conditions:
            raise UserError("PixArt models with additional (resolution / aspect) conditions are not supported")
        t = max_text_tokens or 300  # PixArt-Σ's max_sequence_length
        d = pipe.text_encoder.config.d_model
        specs.append(
            ComponentSpec(
                "text_encoder",
                T5Encoder(pipe.text_encoder, with_mask=True),
                [_i64("input_ids", 1, t), _i64("attention_mask", 1, t)],
                [_f32("last_hidden_state", 1, t, d)],
                {"tokenizer": "tokenizer", "max_length": t},
            )
        )
        c_out = pipe.transformer.config.out_channels
        specs.append(
            ComponentSpec(
                "transformer",
                PixArtTransformer(pipe.transformer),
                [
                    _f32("sample", batch, c_lat, h, w),
                    _f32("timestep", batch),
                    _f32("encoder_hidden_states", batch, t, d),
                    _f32("encoder_attention_mask", batch, t),
                ],
                [_f32("out_sample", batch, c_out, h, w)],
            )
        )
    elif family == "sd3":
        t = max_text_tokens or 256  # SD3's T5 max_sequence_length
        clip_len = pipe.tokenizer.model_max_length
        dims = []
        for enc_name, tok_name in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
            enc = getattr(pipe, enc_name)
            d, p = enc.config.hidden_size, enc.config.projection_dim
            dims.append((d, p))
            specs.append(
                ComponentSpec(
                    enc_name,
                    ClipEncoder(enc),
                    [_i64("input_ids", 1, clip_len)],
                    [_f32("hidden_states", 1, clip_len, d), _f32("text_embeds", 1, p)],
                    {"tokenizer": tok_name, "max_length": clip_len},
                )
            )
        d_t5 = pipe.text_encoder_3.config.d_model
        specs.append(
            ComponentSpec(
                "text_encoder_3",
                T5Encoder(pipe.text_encoder_3, with_mask=False),
                [_i64("input_ids", 1, t)],
                [_f32("last_hidden_state", 1, t, d_t5)],
                {"tokenizer": "tokenizer_3", "max_length": t},
            )
        )
        specs.append(
            ComponentSpec(
                "transformer",
                SD3Transformer(pipe.transformer),
                [
                    _f32("sample", batch, c_lat, h, w),
                    _f32("timestep", batch),
                    _f32("encoder_hidden_states", batch, clip_len + t, d_t5),
                    _f32("pooled_projections", batch, sum(p for _, p in dims)),
                ],
                [_f32("out_sample", batch, pipe.transformer.config.out_channels, h, w)],
            )
        )
    else:
        raise UserError(f"unknown pipeline family {family!r}")
    specs.append(
        ComponentSpec(
            "vae_decoder",
            VaeDecoder(pipe.vae),
            [_f32("latent_sample", 1, c_lat, h, w)],
            [_f32("sample", 1, 3, height, width)],
        )
    )
    specs.append(
        ComponentSpec(
            "vae_encoder",
            VaeEncoder(pipe.vae),
            [_f32("sample", 1, 3, height, width)],
            [_f32("latent_mean", 1, c_lat, h, w)],
        )
    )
    return specs
