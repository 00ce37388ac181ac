"""The model families, torch-free half: one entry per diffusers text-to-image pipeline family (PixArt-Σ, SD3).

An entry says everything the on-device side needs to know about a family: its text encoders and their tokenizers
(names, kinds, default lengths), how a prompt is preprocessed and turned into the transformer's conditioning
inputs, the default guidance, how the loop scales the initial noise and the model input, and the name of the
`edit-mobile convert --arch` that turns its teacher into a student. The runtime loop, calibration, validation, the
fp16-safety pass, Core ML quantization and the exporter ask this registry; none of them branches on a family name.

The torch half (teacher / student classes, the diffusers reference call, the transformer's export wrapper, the
distillation objective) is `models/families.py`, keyed by the same names. Adding a family is one `Family` entry
here, one `TorchFamily` entry there, and its models.

No torch here: the runtime imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .tokenizer import Encoding


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family and the tokenizer that feeds it."""

    component: str  # package component and diffusers pipeline attribute: "text_encoder", "text_encoder_2", ...
    tokenizer: str  # tokenizer folder and diffusers pipeline attribute: "tokenizer", "tokenizer_2", ...
    # "t5" (outputs last_hidden_state) or "clip" (hidden_states: the penultimate layer, text_embeds: projected
    # pooled); export/components.py builds the graph by kind
    kind: str
    inputs: tuple[str, ...]  # the graph's inputs, from the tokenizer's encoding: input_ids (, attention_mask)
    # Static token length: None = the tokenizer's own model_max_length (CLIP's 77); a number = diffusers'
    # max_sequence_length default for this encoder, which `--max-text-tokens` overrides.
    max_length: int | None = None

    def feed(self, encoding: Encoding) -> dict[str, np.ndarray]:
        """The graph's inputs from a tokenizer encoding."""
        return text_feed(encoding, self.inputs)


# Text encoders' outputs, by component: (the tokenizer's encoding, the graph's outputs).
Encoded = Mapping[str, tuple[Encoding, Mapping[str, np.ndarray]]]


@dataclass(frozen=True)
class Family:
    """A text-to-image pipeline family as the runtime runs it (diffusers' pipeline, step for step)."""

    name: str  # the manifest's `family`
    title: str  # in user-facing text: "PixArt-Σ"
    text_encoders: tuple[TextEncoder, ...]  # in the order the pipeline runs them
    default_guidance: float  # diffusers' pipeline default
    conditioning: tuple[str, ...]  # the transformer's inputs after `sample` and `timestep`, in graph order
    # The text encoders' outputs of one prompt (batch 1) -> the transformer's conditioning inputs, by name.
    combine: Callable[[Encoded], dict[str, np.ndarray]]
    preprocess: Callable[[str], str]  # prompt text before tokenization
    scales_initial_noise: bool  # the pipeline multiplies passed latents by the scheduler's init_noise_sigma
    scales_model_input: bool  # the pipeline calls scheduler.scale_model_input before the transformer
    convert_arch: str  # `edit-mobile convert --arch` for this family's teacher
    student_title: str  # what the conversion makes: "EDiT"

    @property
    def prompt_encoder(self) -> TextEncoder:
        """The encoder whose length `--max-text-tokens` sets (T5: diffusers' `max_sequence_length`)."""
        return next(e for e in self.text_encoders if e.max_length is not None)

    @property
    def default_text_tokens(self) -> int:
        return self.prompt_encoder.max_length

    def encode_prompt(
        self,
        prompt: str,
        tokenizers: Mapping,
        run: Callable[..., Mapping[str, np.ndarray]],
    ) -> dict[str, np.ndarray]:
        """One prompt's transformer conditioning, batch 1: preprocess, tokenize and run every text encoder
        (`run(component, **inputs)`), then combine their outputs as the diffusers pipeline does."""
        prompt = self.preprocess(prompt)
        encoded = {}
        for enc in self.text_encoders:
            encoding = tokenizers[enc.component].encode(prompt)
            encoded[enc.component] = (encoding, run(enc.component, **enc.feed(encoding)))
        return self.combine(encoded)


def text_feed(encoding: Encoding, names) -> dict[str, np.ndarray]:
    """A text encoder's input feed from a tokenizer encoding, restricted to `names` (in the order ids, mask)."""
    values = {"input_ids": encoding.input_ids, "attention_mask": encoding.attention_mask}
    return {k: v for k, v in values.items() if k in names}


def unscale_latents(latents: np.ndarray, vae: Mapping) -> np.ndarray:
    """Scaled latents (what the transformer denoises) -> the VAE decoder's input, as diffusers' pipelines decode:
    `latents / scaling_factor + shift_factor` (`vae`: the manifest's `vae` field; shift_factor null: none)."""
    latents = latents / np.float32(vae["scaling_factor"])
    if vae.get("shift_factor") is not None:
        latents = latents + np.float32(vae["shift_factor"])
    return latents


# --- PixArt-Σ -------------------------------------------------------------------------------------------------------
def _pixart_preprocess(text: str) -> str:
    # PixArtSigmaPipeline._text_preprocessing with clean_caption off (its bs4 / ftfy cleaning is not reproduced).
    return text.lower().strip()


def _pixart_combine(encoded: Encoded) -> dict[str, np.ndarray]:
    # PixArtSigmaPipeline.encode_prompt: T5's last hidden states; the T5 attention mask goes to the transformer.
    encoding, out = encoded["text_encoder"]
    return {
        "encoder_hidden_states": out["last_hidden_state"],
        "encoder_attention_mask": encoding.attention_mask.astype(np.float32),
    }


# --- SD3 ------------------------------------------------------------------------------------------------------------
def _unchanged(text: str) -> str:
    return text


def _sd3_combine(encoded: Encoded) -> dict[str, np.ndarray]:
    # StableDiffusion3Pipeline.encode_prompt: cat(CLIP-L, CLIP-G) penultimate hidden states, zero-padded to the T5
    # width, then cat(clip, t5) along the tokens; pooled: cat(CLIP-L, CLIP-G) projected embeddings. Its padding is
    # F.pad by (T5 width - CLIP width), which crops when the CLIPs are wider (the shapes SD3 model: 96 > 64).
    clip = [encoded[name][1] for name in ("text_encoder", "text_encoder_2")]
    t5 = encoded["text_encoder_3"][1]["last_hidden_state"]
    hidden = np.concatenate([out["hidden_states"] for out in clip], axis=-1)[..., : t5.shape[-1]]
    hidden = np.pad(hidden, ((0, 0), (0, 0), (0, t5.shape[-1] - hidden.shape[-1])))
    return {
        "encoder_hidden_states": np.concatenate([hidden, t5], axis=1),
        "pooled_projections": np.concatenate([out["text_embeds"] for out in clip], axis=-1),
    }


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="pixart",
            title="PixArt-Σ",
            text_encoders=(TextEncoder("text_encoder", "tokenizer", "t5", ("input_ids", "attention_mask"), 300),),
            default_guidance=4.5,
            conditioning=("encoder_hidden_states", "encoder_attention_mask"),
            combine=_pixart_combine,
            preprocess=_pixart_preprocess,
            scales_initial_noise=True,  # PixArtSigmaPipeline.prepare_latents scales passed latents
            scales_model_input=True,
            convert_arch="edit",
            student_title="EDiT",
        ),
        Family(
            name="sd3",
            title="SD3",
            text_encoders=(
                TextEncoder("text_encoder", "tokenizer", "clip", ("input_ids",)),
                TextEncoder("text_encoder_2", "tokenizer_2", "clip", ("input_ids",)),
                TextEncoder("text_encoder_3", "tokenizer_3", "t5", ("input_ids",), 256),
            ),
            default_guidance=7.0,
            conditioning=("encoder_hidden_states", "pooled_projections"),
            combine=_sd3_combine,
            preprocess=_unchanged,
            scales_initial_noise=False,  # StableDiffusion3Pipeline uses passed latents as they are
            scales_model_input=False,  # and never calls scale_model_input
            convert_arch="mm-edit",
            student_title="MM-EDiT",
        ),
    )
}


def family(name: str) -> Family:
    """The registry entry of a family name (UserError naming the known ones otherwise)."""
    if name not in FAMILIES:
        raise UserError(f"unknown model family {name!r}; expected one of {', '.join(FAMILIES)}")
    return FAMILIES[name]


def describe(values: Callable[[Family], object], sep: str = ", ") -> str:
    """Per-family values for help texts: describe(lambda f: f.default_guidance) -> '4.5 PixArt-Σ, 7.0 SD3'."""
    return sep.join(f"{values(f)} {f.title}" for f in FAMILIES.values())
