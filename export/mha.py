"""The fused ONNX graph `edit-mobile export` ships by default (`--graph fused`; docs/export.md): every softmax
attention of the transformer as ONNX Runtime's fused `com.microsoft.MultiHeadAttention` (its CPU kernel is a tiled,
memory-efficient flash attention), then ONNX Runtime's transformer optimizer (FastGelu, SkipLayerNormalization).
The scaling study (scripts/bench_scaling.py) measures EDiT and its teacher in this form and in the plain one.

ONNX Runtime's optimizer does not produce MHA itself from our graphs: its `bert` mode fuses no attention in them,
its `unet` mode emits `NhwcConv` (no CPU kernel) and its `mmdit` mode matched no attention in our SD3 graph. So the
attention is exported as MHA directly, by attention processors that compute in PyTorch exactly what the model's
own compute and trace each softmax to one fused node: `MHAExportProcessor` for diffusers' AttnProcessor2_0 /
JointAttnProcessor2_0, `MMEDiTMHAExportProcessor` for MM-EDiT's hybrid attention (its two softmax terms).

  fused_attention(module)        context: the softmax attention of `module`'s transformers traces to MHA nodes
  optimize_transformer(...)      ONNX Runtime's transformer optimizer on an exported graph, in a given mode
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx


def _mha_function():
    import torch
    import torch.nn.functional as F

    class OrtMultiHeadAttention(torch.autograd.Function):
        """SDPA in PyTorch; ONNX Runtime's fused MultiHeadAttention (q, k, v as (B, S, C)) in the exported graph.

        `keep` (B, L) int32 (1 = attend) is MHA's key_padding_mask; MHA adds mask_filter_value (-10000, the same
        as diffusers' attention bias) to masked scores. MHA's optional `bias` input (3C) is passed as zeros because
        the TorchScript exporter cannot leave an optional input empty."""

        @staticmethod
        def forward(ctx, q, k, v, keep, heads: int):
            b, s, c = q.shape

            def split(x):
                return x.reshape(b, x.shape[1], heads, c // heads).transpose(1, 2)

            bias = None if keep is None else (1.0 - keep.to(q.dtype))[:, None, None, :] * -10000.0
            y = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
            return y.transpose(1, 2).reshape(b, s, c)

        @staticmethod
        def symbolic(g, q, k, v, keep, heads: int):
            inputs = [q, k, v]
            if keep is not None and not keep.node().mustBeNone():
                c = q.type().sizes()[-1]
                inputs += [g.op("Constant", value_t=torch.zeros(3 * c)), keep]
            y = g.op("com.microsoft::MultiHeadAttention", *inputs, num_heads_i=heads)
            y.setType(q.type())
            return y

    return OrtMultiHeadAttention


def _cat(a, b):
    import torch

    return torch.cat([a, b], dim=1)


def _qk_norm(x, norm, heads: int):
    """SD3's RMSNorm over each head's channels, on the (B, S, C) layout MHA takes (None: no norm)."""
    if norm is None:
        return x
    b, s, c = x.shape
    return norm(x.reshape(b, s, heads, c // heads)).reshape(b, s, c)


class MHAExportProcessor:
    """A diffusers attention processor (self-, cross- and SD3 joint attention) that computes exactly what
    AttnProcessor2_0 / JointAttnProcessor2_0 compute, with the attention itself as one fused MHA call."""

    def __init__(self):
        self.mha = _mha_function()

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, grid_size=None
    ):  # grid_size: what EDiT blocks pass to every attention; unused here
        b, n, _ = hidden_states.shape
        heads = attn.heads
        q = _qk_norm(attn.to_q(hidden_states), attn.norm_q, heads)
        joint = encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None
        if joint:  # SD3: one softmax over [image; prompt] tokens
            k = _qk_norm(attn.to_k(hidden_states), attn.norm_k, heads)
            v = attn.to_v(hidden_states)
            qp = _qk_norm(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q, heads)
            kp = _qk_norm(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k, heads)
            vp = attn.add_v_proj(encoder_hidden_states)
            y = self.mha.apply(_cat(q, qp), _cat(k, kp), _cat(v, vp), None, heads)
            y_img, y_txt = y[:, :n], y[:, n:]
            out = attn.to_out[1](attn.to_out[0](y_img))
            if attn.context_pre_only:
                return out, encoder_hidden_states
            return out, attn.to_add_out(y_txt)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k = _qk_norm(attn.to_k(context), attn.norm_k, heads)
        v = attn.to_v(context)
        keep = None
        if attention_mask is not None:  # PixArt: (B, 1, L) additive bias, 0 = keep, -10000 = masked
            keep = (attention_mask.reshape(b, -1) > -1.0).int()
        y = self.mha.apply(q, k, v, keep, heads)
        return attn.to_out[1](attn.to_out[0](y))


class MMEDiTMHAExportProcessor:
    """MM-EDiT's hybrid attention (models/mm_edit_attention.py, eta by token count) computing exactly what
    MMEDiTAttnProcessor computes, with its two softmax terms (image rows over prompt keys; prompt rows over
    [image; prompt] keys) as fused MHA calls on the (B, S, C) layout; the linear term is EDiT's own."""

    def __init__(self, config):
        self.config = config
        self.mha = _mha_function()

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, grid_size=None):
        from ..models.edit_attention import edit_qkv, merge_heads, relu_linear_attention

        heads, n_i, n_p = attn.heads, hidden_states.shape[1], encoder_hidden_states.shape[1]
        q_i = _qk_norm(attn.to_q(hidden_states), attn.norm_q, heads)  # (B, N_I, C)
        k_i = _qk_norm(attn.to_k(hidden_states), attn.norm_k, heads)
        v_i = attn.to_v(hidden_states)
        q_p = _qk_norm(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q, heads)  # (B, N_P, C)
        k_p = _qk_norm(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k, heads)
        v_p = attn.add_v_proj(encoder_hidden_states)

        q_lin, k_lin, v_lin = edit_qkv(attn, hidden_states, grid_size)
        y_lin = merge_heads(relu_linear_attention(q_lin, k_lin, v_lin, self.config.eps, self.config.accumulate_fp32))
        y_cross = self.mha.apply(q_i, k_p, v_p, None, heads)  # (B, N_I, C)
        eta = n_i / (n_i + n_p)
        image_out = attn.to_out[1](attn.to_out[0](eta * y_lin + (1.0 - eta) * y_cross))
        if attn.context_pre_only:
            return image_out, encoder_hidden_states
        y_p = self.mha.apply(q_p, _cat(k_i, k_p), _cat(v_i, v_p), None, heads)  # (B, N_P, C)
        return image_out, attn.to_add_out(y_p)


@contextmanager
def fused_attention(module) -> Iterator[int]:
    """Inside the block, every softmax attention of the diffusers transformers in `module` traces to fused MHA
    nodes: diffusers' AttnProcessor2_0 / JointAttnProcessor2_0 (a PixArt teacher's self- and cross-attention, an
    EDiT's prompt cross-attention, an SD3 teacher's joint attention) through `MHAExportProcessor`, MM-EDiT's hybrid
    attention through `MMEDiTMHAExportProcessor`; yields how many were swapped. EDiT's linear self-attention, MM-EDiT
    with the analysis-only exact eta, and attention with a group norm or a residual inside the processor (the
    VAE's) are left alone. The processors are restored on exit: the PyTorch model the package is validated against
    keeps its own."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0

    from ..models.mm_edit_attention import MMEDiTAttnProcessor

    def export_processor(attn):
        processor = attn.processor
        if isinstance(processor, MMEDiTAttnProcessor):
            return None if processor.config.eta_mode == "exact" else MMEDiTMHAExportProcessor(processor.config)
        plain = attn.group_norm is None and attn.spatial_norm is None and not attn.residual_connection
        if plain and isinstance(processor, (AttnProcessor2_0, JointAttnProcessor2_0)):
            return MHAExportProcessor()
        return None

    swapped = []
    for attn in module.modules():
        if isinstance(attn, Attention) and (fused := export_processor(attn)) is not None:
            swapped.append((attn, attn.processor))
            attn.set_processor(fused)
    try:
        yield len(swapped)
    finally:
        for attn, processor in swapped:
            attn.set_processor(processor)


def optimize_transformer(src: Path, dst: Path, mode: str = "bert", num_heads: int = 0, hidden_size: int = 0) -> dict:
    """ONNX Runtime's transformer optimizer (`onnxruntime.transformers.optimizer`, model_type `mode`, opt_level 0:
    its fusions only, no session optimizations baked in) on the graph `src`, saved to `dst` (weights in
    `dst`.data when `src` keeps them outside); returns {"mode", "fusions"}. num_heads / hidden_size 0: detected.

    Its simplified-LayerNorm fusion crashes on the EDiT GroupNorm pattern; LayerNorm fusion itself is done by ONNX
    Runtime's session optimizer anyway, so it is kept off for every graph, teacher or student."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    external = any(
        t.data_location == onnx.TensorProto.EXTERNAL
        for t in onnx.load(str(src), load_external_data=False).graph.initializer
    )
    fusion = FusionOptions(mode)
    fusion.enable_layer_norm = False
    optimized = optimize_model(
        str(src),
        model_type=mode,
        num_heads=num_heads,
        hidden_size=hidden_size,
        optimization_options=fusion,
        opt_level=0,
    )
    optimized.save_model_to_file(str(dst), use_external_data_format=external)
    return {"mode": mode, "fusions": {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}}
