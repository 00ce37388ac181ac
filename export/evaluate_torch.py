"""The diffusers side of `edit-mobile evaluate` (torch): one image per prompt through the diffusers pipeline, from
the runtime's numpy initial noise, so that a pipeline and its exported package start from the same latents.

The call mirrors `edit-mobile validate`'s reference run (export/validate.py: `run_reference`): empty negative
prompt, the given guidance (default: the pipeline's), `latents=` the unscaled noise of `initial_noise` (PixArt-Σ's
pipeline scales passed latents by init_noise_sigma, SD3's does not: the runtime does the same), PixArt-Σ without
caption cleaning or resolution binning, and the text length the package exporter uses by default (diffusers'
own defaults: 300 T5 tokens for PixArt-Σ, 256 for SD3).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from ..models.convert import load_pipeline, pipeline_family, trained_text_tokens
from ..models.families import torch_family
from ..runtime.errors import UserError
from ..runtime.families import family as family_spec
from ..runtime.pipeline import initial_noise


def generate_with_diffusers(
    src: str,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float | None,
    resolution: int | None = None,
    progress: bool = False,
) -> tuple[list[Image.Image], dict]:
    """A preset name or diffusers pipeline folder -> (PIL images, {"kind", "family", "resolution", "guidance"})."""
    pipe = load_pipeline(src)
    family = pipeline_family(pipe)
    guidance = family_spec(family).default_guidance if guidance is None else float(guidance)
    config = pipe.transformer.config
    scale = pipe.vae_scale_factor
    side = resolution if resolution is not None else int(config.sample_size) * scale
    multiple = scale * int(config.patch_size)
    if side % multiple:
        raise UserError(f"--resolution {side} is not a multiple of {multiple} (VAE factor x patch size)")
    latent_shape = (int(config.in_channels), side // scale, side // scale)
    pipe.set_progress_bar_config(disable=not progress)
    # the prompt length the model was trained at (SD3 attends to its padding: diffusers' default 256 would not do)
    tokens = trained_text_tokens(src)
    text = {} if tokens is None else {"max_sequence_length": tokens}
    images = []
    for prompt, seed in zip(prompts, seeds):
        noise = initial_noise(SimpleNamespace(latent_shape=latent_shape), seed)
        kwargs = dict(
            prompt=prompt,
            negative_prompt="",
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=side,
            width=side,
            latents=torch.from_numpy(noise.copy()),
            output_type="np",
        )
        kwargs.update(torch_family(family).reference_kwargs, **text)  # e.g. PixArt: no resolution binning
        with torch.inference_mode():
            image = pipe(**kwargs).images[0]
        images.append(Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)))
    return images, {"kind": "diffusers", "family": family, "resolution": [side, side], "guidance": guidance}
