"""The model families, torch half: per family of `runtime/families.py` (same keys), what needs torch / diffusers.

  pipelines          the diffusers pipeline classes of the family (what `load_pipeline` accepts)
  teacher, student   the transformer classes `edit-mobile convert --arch` converts between
  reference_transformer  the diffusers transformer with positional inputs (sample, timestep, *conditioning): what
                     the exported graphs compute
  transformer_graph  what is exported: the same computation block by block, as one graph
  transformer_chunk  or a run of its blocks as one graph of a chain (models/transformer_chunks.py)
  reference_kwargs   what `edit-mobile validate` passes to the diffusers pipeline besides prompt, steps, guidance,
                     size, latents and text length, so that diffusers runs the loop the runtime runs
  step_callback      how the pipeline reports the latents after each step
  noise              the distillation objective's noise process: timestep sampling, noisy input, task target
  call_kwargs        the fixed extra arguments of a transformer call (PixArt's micro-conditions)
  attention_modules  the attention layers EDiT replaces, whose outputs feature distillation compares
  max_latent_grid    the largest latent grid (in patches) the transformer accepts, None if unbounded

Adding a family is one `Family` entry in runtime/families.py, one `TorchFamily` entry here, and its models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler, PixArtTransformer2DModel, SD3Transformer2DModel
from torch import nn

from ..runtime.errors import UserError
from ..runtime.families import FAMILIES, Family
from .edit_pixart import EDiTPixArtTransformer2DModel
from .mm_edit_sd3 import MMEDiTSD3Transformer2DModel
from .transformer_chunks import PixArtChunk, PixArtGraph, SD3Chunk, SD3Graph


# --- the transformer with positional inputs (the export's reference) --------------------------------------------------
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


# --- the diffusers reference run: per-step latents ------------------------------------------------------------------
def _legacy_callback(record: Callable) -> dict:
    """PixArt-Σ's older `callback(step, timestep, latents)`, every step."""
    return {"callback": lambda _i, _t, latents: record(latents), "callback_steps": 1}


def _step_end_callback(record: Callable) -> dict:
    """`callback_on_step_end(pipe, step, timestep, kwargs)` (SD3)."""

    def on_step_end(_pipe, _i, _t, kwargs):
        record(kwargs["latents"])
        return kwargs

    return {"callback_on_step_end": on_step_end}


# --- distillation: noise processes ----------------------------------------------------------------------------------
class DDPMNoise:
    """PixArt-Σ: DDPM noise with the betas of the pipeline's scheduler config (`DDPMScheduler.from_config`),
    t ~ U{0..T-1}; the task target is the noise (ε-prediction)."""

    prediction = "epsilon"

    def __init__(self, scheduler_config):
        self.num_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        self.ddpm = DDPMScheduler.from_config(scheduler_config)

    def sample_u(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(n, generator=generator)  # t uniform over the DDPM timesteps

    def noisy(self, x0, u, noise):
        """u in [0, 1) per sample -> (x_t, timestep, task target)."""
        t = (u * self.num_timesteps).long().clamp(max=self.num_timesteps - 1).to(x0.device)
        return self.ddpm.add_noise(x0, noise, t), t, noise  # ε-prediction

    def snr_weights(self, timestep, gamma: float) -> torch.Tensor:
        """Min-SNR-γ weights of the ε loss (Hang et al. 2023): min(SNR(t), γ) / SNR(t), SNR = ᾱ / (1 - ᾱ)."""
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.ddpm, timestep)
        return torch.clamp(snr, max=gamma) / snr


class FlowMatchNoise:
    """SD3: rectified flow, x_t = (1-σ) x0 + σ ε, target ε - x0 (velocity); σ from SD3's logit-normal density
    (u = sigmoid(n), n ~ N(0, 1)) mapped through the scheduler's shift (σ = s·u / (1 + (s-1)·u), as
    `FlowMatchEulerDiscreteScheduler`'s shifted sigmas), timestep = σ·T."""

    prediction = "velocity"

    def __init__(self, scheduler_config):
        self.num_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        self.shift = float(scheduler_config.get("shift", 1.0))

    def sample_u(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.sigmoid(torch.randn(n, generator=generator))  # SD3's logit-normal(0, 1)

    def noisy(self, x0, u, noise):
        """u in [0, 1) per sample -> (x_t, timestep, task target)."""
        sigma = (self.shift * u / (1 + (self.shift - 1) * u)).to(x0.device, x0.dtype)  # shifted, in (0, 1)
        s = sigma.view(-1, 1, 1, 1)
        return (1 - s) * x0 + s * noise, sigma * self.num_timesteps, noise - x0  # velocity target


# --- distillation: transformer calls and distilled layers -----------------------------------------------------------
def _pixart_call_kwargs(x_t, additional_conditions: bool, vae_scale: int) -> dict:
    if additional_conditions:  # PixArt-α 1024: micro-conditions in pixels
        b, _, h, w = x_t.shape
        px = (h * vae_scale, w * vae_scale)
        return {
            "added_cond_kwargs": {
                "resolution": torch.tensor([px] * b, dtype=x_t.dtype, device=x_t.device),
                "aspect_ratio": torch.tensor([[h / w]] * b, dtype=x_t.dtype, device=x_t.device),
            }
        }
    return {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def _no_call_kwargs(x_t, additional_conditions: bool, vae_scale: int) -> dict:
    return {}


def _pixart_attention(transformer, edit) -> list:
    """PixArt: every block's self-attention `attn1` (the prompt cross-attention stays softmax)."""
    return [b.attn1 for b in transformer.transformer_blocks]


def _sd3_attention(transformer, edit) -> list:
    """SD3: every block's joint attention `attn`, and SD3.5's image-only `attn2` where the student converted it."""
    mods = []
    for b in transformer.transformer_blocks:
        mods.append(b.attn)
        if b.attn2 is not None and edit.convert_dual_attention:
            mods.append(b.attn2)
    return mods


def _unbounded(config) -> int | None:
    return None  # PixArt interpolates its position embeddings to any grid


def _pos_embed_grid(config) -> int | None:
    return config.pos_embed_max_size  # SD3 crops a fixed position-embedding table


def _pixart_bins(config) -> dict | None:
    """The aspect-ratio buckets PixArtSigmaPipeline bins to for this transformer's sample size (runtime/binning.py)."""
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
        ASPECT_RATIO_2048_BIN,
    )

    tables = {
        32: ASPECT_RATIO_256_BIN,
        64: ASPECT_RATIO_512_BIN,
        128: ASPECT_RATIO_1024_BIN,
        256: ASPECT_RATIO_2048_BIN,
    }
    table = tables.get(config.sample_size)
    return {k: [int(h), int(w)] for k, (h, w) in table.items()} if table else None


def _no_bins(config) -> dict | None:
    return None  # SD3's pipeline takes any size its position table covers


def _pixart_encode_caption(pipe, caption: str, device, dtype, max_tokens: int) -> tuple:
    """T5 states of the caption's own tokens: under T5's attention mask the padding to max_tokens that the pipeline
    adds changes nothing for them, and would cost up to 300 tokens per caption."""
    text = pipe._text_preprocessing(caption, clean_caption=False)[0]
    n_tokens = len(pipe.tokenizer(text, truncation=True, max_length=max_tokens).input_ids)
    emb, mask, _, _ = pipe.encode_prompt(
        caption, do_classifier_free_guidance=False, device=device, clean_caption=False, max_sequence_length=n_tokens
    )
    n = max(int(mask[0].sum()), 1)
    return (emb[0, :n].to(dtype),)  # (n, D)


def _pixart_collate(items: list[tuple], dtype, device) -> dict:
    """Pad a batch to its longest caption, with the attention mask (equal to the pipeline's fixed-length padding)."""
    n = max(item[0].shape[0] for item in items)
    emb = torch.zeros(len(items), n, items[0][0].shape[-1], dtype=dtype, device=device)
    mask = torch.zeros(len(items), n, dtype=torch.long, device=device)
    for i, (e,) in enumerate(items):
        emb[i, : e.shape[0]], mask[i, : e.shape[0]] = e, 1
    return {"encoder_hidden_states": emb, "encoder_attention_mask": mask}


def _sd3_encode_caption(pipe, caption: str, device, dtype, max_tokens: int) -> tuple:
    """The joint CLIP-L/G + T5 prompt embeddings and the pooled projections (SD3 has no text mask)."""
    emb, _, pooled, _ = pipe.encode_prompt(
        caption, caption, caption, device=device, do_classifier_free_guidance=False, max_sequence_length=max_tokens
    )
    return emb[0].to(dtype), pooled[0].to(dtype)  # (T, D), (P,)


def _sd3_collate(items: list[tuple], dtype, device) -> dict:
    return {
        "encoder_hidden_states": torch.stack([e for e, _ in items]),
        "pooled_projections": torch.stack([p for _, p in items]),
    }


@dataclass(frozen=True)
class TorchFamily:
    """The torch half of one family (see the module docstring); `spec` is its torch-free half."""

    spec: Family
    pipelines: tuple[str, ...]
    teacher: type
    student: type
    reference_transformer: type[nn.Module]
    transformer_graph: type[nn.Module]
    transformer_chunk: type[nn.Module]
    step_callback: Callable[[Callable], dict]
    noise: Callable[[dict], DDPMNoise | FlowMatchNoise]
    call_kwargs: Callable[[torch.Tensor, bool, int], dict]
    attention_modules: Callable[[nn.Module, object], list]
    max_latent_grid: Callable[[object], int | None]
    resolution_bins: Callable[[object], dict | None]  # transformer config -> the pipeline's aspect-ratio buckets
    # Distillation data: one caption -> its cached encoding (tensors), a batch of those -> the transformer's kwargs.
    encode_caption: Callable[..., tuple]
    collate_text: Callable[[list[tuple], object, object], dict]
    reference_kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def arch(self) -> str:
        return self.spec.convert_arch


TORCH_FAMILIES: dict[str, TorchFamily] = {
    f.name: f
    for f in (
        TorchFamily(
            spec=FAMILIES["pixart"],
            pipelines=("PixArtSigmaPipeline", "PixArtAlphaPipeline"),
            teacher=PixArtTransformer2DModel,
            student=EDiTPixArtTransformer2DModel,
            reference_transformer=PixArtTransformer,
            transformer_graph=PixArtGraph,
            transformer_chunk=PixArtChunk,
            step_callback=_legacy_callback,
            noise=DDPMNoise,
            call_kwargs=_pixart_call_kwargs,
            attention_modules=_pixart_attention,
            max_latent_grid=_unbounded,
            resolution_bins=_pixart_bins,
            encode_caption=_pixart_encode_caption,
            collate_text=_pixart_collate,
            # the runtime neither cleans captions (bs4 / ftfy) nor bins resolutions
            reference_kwargs={"clean_caption": False, "use_resolution_binning": False},
        ),
        TorchFamily(
            spec=FAMILIES["sd3"],
            pipelines=("StableDiffusion3Pipeline",),
            teacher=SD3Transformer2DModel,
            student=MMEDiTSD3Transformer2DModel,
            reference_transformer=SD3Transformer,
            transformer_graph=SD3Graph,
            transformer_chunk=SD3Chunk,
            step_callback=_step_end_callback,
            noise=FlowMatchNoise,
            call_kwargs=_no_call_kwargs,
            attention_modules=_sd3_attention,
            max_latent_grid=_pos_embed_grid,
            resolution_bins=_no_bins,
            encode_caption=_sd3_encode_caption,
            collate_text=_sd3_collate,
        ),
    )
}
if set(TORCH_FAMILIES) != set(FAMILIES):  # the two halves of the registry name the same families
    raise RuntimeError(f"models/families.py has {sorted(TORCH_FAMILIES)}, runtime/families.py {sorted(FAMILIES)}")

# Lookups derived from the registry.
SUPPORTED_PIPELINES = {p: f.name for f in TORCH_FAMILIES.values() for p in f.pipelines}  # class name -> family
ARCHS = {f.arch: f for f in TORCH_FAMILIES.values()}  # convert --arch -> family
TEACHER_CLASSES = {f.teacher.__name__: f.name for f in TORCH_FAMILIES.values()}
STUDENT_CLASSES = {f.student.__name__: f.name for f in TORCH_FAMILIES.values()}


def torch_family(name: str) -> TorchFamily:
    if name not in TORCH_FAMILIES:
        raise UserError(f"unknown model family {name!r}; expected one of {', '.join(TORCH_FAMILIES)}")
    return TORCH_FAMILIES[name]


def pipeline_family(pipe) -> str:
    """The family name of a loaded diffusers pipeline (UserError for a pipeline class no family runs)."""
    name = type(pipe).__name__
    if name not in SUPPORTED_PIPELINES:
        raise UserError(f"unsupported pipeline class {name}; expected one of {', '.join(SUPPORTED_PIPELINES)}")
    return SUPPORTED_PIPELINES[name]
