"""The transformer architectures the studies measure, taken from the model presets' builders (models/presets.py),
so that no study writes an architecture out again.

A preset builds a whole pipeline at true size (transformer, text encoders, VAE). The studies need only its
transformer's config, at another depth or latent size: `transformer_config` builds the preset's pipeline with
empty weights (accelerate's `init_empty_weights`: every parameter on the meta device, no memory, no init) and
returns the transformer's diffusers config; `teacher` builds that transformer with real random weights and the
overrides (`num_layers`, `sample_size`, ...). `pipeline` does the same for a whole pipeline.

torch and diffusers are imported inside the functions: a study's parent process stays torch-free.
"""

from __future__ import annotations

import functools
import json

# The preset whose transformer is each study architecture (the teacher), and the conversion the study compares.
PRESET = {"pixart": "pixart-sigma-xl", "sd3": "sd35-medium"}


@functools.cache
def _empty_pipeline(preset: str):
    from accelerate import init_empty_weights

    from edit_mobile.models.presets import PRESETS

    with init_empty_weights():
        return PRESETS[preset].build()


def transformer_config(preset: str) -> dict:
    """The diffusers config (JSON-able, with `_class_name`) of the preset's transformer."""
    return json.loads(_empty_pipeline(preset).transformer.to_json_string())


def vae_scale_factor(preset: str) -> int:
    """Pixels per latent cell of the preset's VAE (8 for the SDXL and SD3 VAEs)."""
    return 2 ** (len(_empty_pipeline(preset).vae.config.block_out_channels) - 1)


def _overridden(config: dict, overrides: dict) -> dict:
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(overrides)
    if "sample_size" in overrides and "interpolation_scale" in config:
        # PixArt: derived from the sample size (diffusers' default), as the presets derive it for theirs
        config["interpolation_scale"] = None
    return config


def build_transformer(config: dict, seed: int = 0, **overrides):
    """The transformer of `config` (a `transformer_config`) with `overrides`, random weights, eval mode."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    cls = getattr(diffusers, config["_class_name"])
    return cls.from_config(_overridden(config, overrides)).eval()


def teacher(preset: str, seed: int = 0, **overrides):
    """The preset's transformer with `overrides` (e.g. num_layers=2, sample_size=128), random weights."""
    return build_transformer(transformer_config(preset), seed=seed, **overrides)


def pipeline(preset: str, seed: int = 0, **transformer_overrides):
    """The preset's whole pipeline with real random weights and its transformer's config overridden (the other
    components as the preset builds them)."""
    import torch

    empty = _empty_pipeline(preset)
    torch.manual_seed(seed)
    components = {}
    for name, component in empty.components.items():
        if name == "transformer":
            component = teacher(preset, seed=seed, **transformer_overrides)
        elif isinstance(component, torch.nn.Module):
            if hasattr(type(component), "from_config"):  # diffusers models
                component = type(component).from_config(component.config)
            else:  # transformers models
                component = type(component)(component.config)
            component = component.eval()
        components[name] = component
    return type(empty)(**components)
