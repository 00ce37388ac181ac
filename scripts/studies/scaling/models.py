"""The scaling study's models: an architecture's description (from its preset), the teacher / student at a given
depth and resolution, the transformer's export spec and realistic timing inputs.

`describe` and the model builders import torch (they run in child processes); `timing_inputs` is numpy only (ONNX
Runtime workers use it). A description is a JSON-able dict:
  arch, preset, config (the preset transformer's diffusers config), heads, head_dim, latent_channels,
  out_channels, context_channels (PixArt: T5 caption channels; SD3: joint attention width), pooled (SD3),
  full_depth, dual_layers (SD3: blocks with dual attention at full depth), patch, vae_factor, text_tokens, timestep
"""

from __future__ import annotations

import re

import numpy as np

from .. import archs
from .plan import ARCHS

ROLE_ALIASES = {"hidden_states": "sample"}  # optimum's input names


def describe(arch: str) -> dict:
    """The architecture of `arch` as the study measures it: its preset's transformer config and the sizes derived
    from it (imports torch: call it in a child process)."""
    study = ARCHS[arch]
    config = archs.transformer_config(study["preset"])
    return {
        "arch": arch,
        "preset": study["preset"],
        "config": config,
        "heads": config["num_attention_heads"],
        "head_dim": config["attention_head_dim"],
        "latent_channels": config["in_channels"],
        "out_channels": config["out_channels"],
        "context_channels": config.get("caption_channels") or config.get("joint_attention_dim"),
        "pooled": config.get("pooled_projection_dim"),
        "full_depth": config["num_layers"],
        "dual_layers": len(config.get("dual_attention_layers") or ()),
        "patch": config["patch_size"],
        "vae_factor": archs.vae_scale_factor(study["preset"]),
        "text_tokens": study["text_tokens"],
        "timestep": study["timestep"],
    }


def dual_layers(depth: int, desc: dict) -> tuple[int, ...]:
    """SD3.5-M has dual attention in its first 13 of 24 blocks: keep that share at reduced depth."""
    full, dual = desc["full_depth"], desc["dual_layers"]
    return tuple(range(max(1, round(depth * dual / full)))) if depth < full else tuple(range(dual))


class IdentityCoreProcessor:
    """Self-attention with its core replaced by the identity on V: the Q, K, V and output projections stay, Q Kᵀ,
    the softmax and · V go. The attention-free bound: no self-attention that keeps the projections is faster.

    Q and K are kept alive by adding 0·(Q + K) to V: unused, the exporter would prune their projections (two of
    the four GEMMs). The add costs three elementwise passes over the tokens, under 0.1 % of the projections' MACs
    at PixArt-Σ-XL width."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is not None:
            raise ValueError("IdentityCoreProcessor replaces self-attention only")
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        hidden_states = value + (query + key) * 0.0  # (B, N, C)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def edit_config_of(family: str):
    """The EDiT configuration a family name asks for: "edit" (the defaults: dense ConvFusion r = 4, compressor stride
    2), "edit-r8" (ConvFusion C -> C/8), "edit-s4" (compressor stride 4), "edit-r8-s4", and with a "-sep" suffix
    the depthwise-separable ConvFusion, with "-nocf" none. Speed only: the weights are a fresh conversion; what the
    variants cost in quality is measured on the shapes model (scripts/study_edit_variants.py)."""
    from edit_mobile.models.edit_attention import EDiTConfig

    match = re.fullmatch(r"edit(?:-r(\d+))?(?:-s(\d+))?(-sep|-nocf)?", family)
    if match is None:
        raise ValueError(f"unknown EDiT variant {family!r}")
    reduction, stride, kind = match.groups()
    convfusion = {None: "dense", "-sep": "separable", "-nocf": "off"}[kind]
    return EDiTConfig(convfusion_reduction=int(reduction or 4), kv_stride=int(stride or 2), convfusion=convfusion)


def build_model(desc: dict, family: str, res: int, depth: int, seed: int = 0):
    """The teacher (family "softmax"), its conversion (family "edit" / "mm-edit"; "edit-r8" ...: `edit_config_of`),
    or the attention-free bound
    (family "bound": the PixArt teacher with `IdentityCoreProcessor` as every self-attention), random weights, eval
    mode."""
    overrides = {"num_layers": depth, "sample_size": res // desc["vae_factor"]}
    if desc["dual_layers"]:
        overrides["dual_attention_layers"] = dual_layers(depth, desc)
    teacher = archs.build_transformer(desc["config"], seed=seed, **overrides)
    if family == "softmax":
        return teacher
    if family == "bound":
        if desc["arch"] != "pixart":
            raise ValueError("the attention-free bound is built for PixArt (self-attention blocks) only")
        for block in teacher.transformer_blocks:
            block.attn1.set_processor(IdentityCoreProcessor())
        return teacher
    if family.startswith("edit"):
        from edit_mobile.models.edit_pixart import EDiTPixArtTransformer2DModel

        return EDiTPixArtTransformer2DModel.from_teacher(teacher, edit_config_of(family)).eval()
    if family == "mm-edit":
        from edit_mobile.models.mm_edit_sd3 import MMEDiTSD3Transformer2DModel

        return MMEDiTSD3Transformer2DModel.from_teacher(teacher).eval()
    raise ValueError(f"unknown model family {family!r}")


def transformer_spec(desc: dict, model, res: int, batch: int):
    """The export spec of the transformer component (docs/package.md), for this resolution and batch."""
    from edit_mobile.export.components import ComponentSpec, PixArtTransformer, SD3Transformer, TensorSpec

    h = res // desc["vae_factor"]

    def f32(name, *shape):
        return TensorSpec(name, tuple(shape), "float32")

    common = [f32("sample", batch, desc["latent_channels"], h, h), f32("timestep", batch)]
    context = f32("encoder_hidden_states", batch, desc["text_tokens"], desc["context_channels"])
    output = [f32("out_sample", batch, desc["out_channels"], h, h)]
    if desc["arch"] == "pixart":
        mask = f32("encoder_attention_mask", batch, desc["text_tokens"])
        return ComponentSpec("transformer", PixArtTransformer(model), [*common, context, mask], output)
    pooled = f32("pooled_projections", batch, desc["pooled"])
    return ComponentSpec("transformer", SD3Transformer(model), [*common, context, pooled], output)


def timing_inputs(desc: dict, res: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Realistic inputs by role: a noisy latent, a mid-schedule timestep, prompt embeddings (PixArt: the T5 mask
    of a 24-token prompt, as the pipeline passes it)."""
    h = res // desc["vae_factor"]
    rng = np.random.default_rng(seed)
    out = {
        "sample": rng.standard_normal((batch, desc["latent_channels"], h, h), dtype=np.float32),
        "timestep": np.full((batch,), desc["timestep"], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal(
            (batch, desc["text_tokens"], desc["context_channels"]), dtype=np.float32
        ),
    }
    if desc["arch"] == "pixart":
        mask = np.zeros((batch, desc["text_tokens"]), dtype=np.float32)
        mask[:, :24] = 1.0
        out["encoder_attention_mask"] = mask
    else:
        out["pooled_projections"] = rng.standard_normal((batch, desc["pooled"]), dtype=np.float32)
    return out


def export_fused_variant(desc: dict, family: str, res: int, depth: int, batch: int, out_dir) -> dict:
    """The graph `edit-mobile export` ships by default (`--graph fused`, export/mha.py): the teacher ("softmax")
    with every attention as fused MHA, EDiT ("edit") with its prompt cross-attention as fused MHA, MM-EDiT
    ("mm-edit") with its two softmax terms as fused MHA; then ONNX Runtime's transformer optimizer. Checked against
    PyTorch on the timing inputs below full depth (at full depth the check would run the 28-block model twice more
    per call of it; the same code is checked at the study's depth)."""
    import onnxruntime as ort
    import torch

    from edit_mobile.export.onnx_export import export_onnx
    from edit_mobile.export.targets import fused_ops

    model = build_model(desc, family, res, depth)
    spec = transformer_spec(desc, model, res, batch)
    path = export_onnx(spec, out_dir, fused=True)
    if depth >= desc["full_depth"]:
        return fused_ops([path])
    inputs = timing_inputs(desc, res, batch, seed=1)
    with torch.inference_mode():
        ref = spec.module(*(torch.from_numpy(inputs[s.name]) for s in spec.inputs)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {s.name: inputs[s.name] for s in spec.inputs})[0]
    return {**fused_ops([path]), "onnx_vs_torch_max_abs": float(np.abs(got - ref).max())}


def optimize_ortopt(desc: dict, src, out_dir) -> dict:
    """Our teacher graph through ONNX Runtime's transformer optimizer in the mode made for this architecture."""
    from edit_mobile.export.mha import optimize_transformer

    mode = "mmdit" if desc["arch"] == "sd3" else "bert"
    return optimize_transformer(src, out_dir / "model.onnx", mode, desc["heads"], desc["heads"] * desc["head_dim"])
