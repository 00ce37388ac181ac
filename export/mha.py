"""Attention exported as ONNX Runtime's fused `com.microsoft.MultiHeadAttention`, and ONNX Runtime's transformer
optimizer: the form in which a peer would ship a softmax DiT for ONNX Runtime CPU (its MHA kernel is a tiled,
memory-efficient flash attention). The scaling study (scripts/bench_scaling.py) measures EDiT against it.

ONNX Runtime's optimizer does not produce this form itself from our graphs: its `bert` mode fuses no attention in
them, its `unet` mode emits `NhwcConv` (no CPU kernel) and its `mmdit` mode matched no attention in our SD3 graph.
So the attention is exported as MHA directly, by an attention processor (`MHAExportProcessor`) that computes in
PyTorch exactly what diffusers' AttnProcessor2_0 / JointAttnProcessor2_0 compute and traces to one fused node.

  use_mha(model, scope)          swap the processors: every attention ("all") or PixArt's prompt cross-attention
                                 only ("cross": EDiT keeps its linear self-attention)
  export_mha_onnx(spec, ...)     trace, fold with ONNX Runtime's basic level, run the transformer optimizer and
                                 check the result against PyTorch
  optimize_transformer(...)      ONNX Runtime's transformer optimizer on an exported graph, in a given mode
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from .components import ComponentSpec
from .onnx_export import trace_onnx


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

        def qk_norm(x, norm):  # SD3's RMSNorm over each head's channels, on the (B, S, C) layout
            if norm is None:
                return x
            s, c = x.shape[1], x.shape[2]
            return norm(x.reshape(b, s, heads, c // heads)).reshape(b, s, c)

        q = qk_norm(attn.to_q(hidden_states), attn.norm_q)
        joint = encoder_hidden_states is not None and getattr(attn, "add_q_proj", None) is not None
        if joint:  # SD3: one softmax over [image; prompt] tokens
            k = qk_norm(attn.to_k(hidden_states), attn.norm_k)
            v = attn.to_v(hidden_states)
            qp = qk_norm(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)
            kp = qk_norm(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)
            vp = attn.add_v_proj(encoder_hidden_states)
            y = self.mha.apply(_cat(q, qp), _cat(k, kp), _cat(v, vp), None, heads)
            y_img, y_txt = y[:, :n], y[:, n:]
            out = attn.to_out[1](attn.to_out[0](y_img))
            if attn.context_pre_only:
                return out, encoder_hidden_states
            return out, attn.to_add_out(y_txt)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k = qk_norm(attn.to_k(context), attn.norm_k)
        v = attn.to_v(context)
        keep = None
        if attention_mask is not None:  # PixArt: (B, 1, L) additive bias, 0 = keep, -10000 = masked
            keep = (attention_mask.reshape(b, -1) > -1.0).int()
        y = self.mha.apply(q, k, v, keep, heads)
        return attn.to_out[1](attn.to_out[0](y))


def use_mha(model, scope: str = "all") -> None:
    """Set `MHAExportProcessor` on every attention of a diffusers transformer ("all"), or on the prompt
    cross-attention (`attn2`) of each block only ("cross": an EDiT keeps its linear self-attention)."""
    if scope == "all":
        model.set_attn_processor(MHAExportProcessor())
    elif scope == "cross":
        blocks = [b for b in model.transformer_blocks if getattr(b, "attn2", None) is not None]
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no prompt cross-attention (attn2) to export as MHA")
        for block in blocks:
            block.attn2.set_processor(MHAExportProcessor())
    else:
        raise ValueError(f"unknown MHA scope {scope!r} (all, cross)")


def optimize_transformer(src: Path, dst: Path, mode: str, num_heads: int, hidden_size: int) -> dict:
    """ONNX Runtime's transformer optimizer (`onnxruntime.transformers.optimizer`, model_type `mode`, opt_level 0)
    on the graph `src`, saved to `dst`; returns {"mode", "fusions", "multi_head_attention_nodes"}.

    Its simplified-LayerNorm fusion crashes on the EDiT GroupNorm pattern; LayerNorm fusion itself is done by ONNX
    Runtime's session optimizer anyway, so it is kept off for every graph, teacher or student."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

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
    optimized.save_model_to_file(str(dst))
    ops = [n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node]
    return {
        "mode": mode,
        "fusions": {k: v for k, v in optimized.get_fused_operator_statistics().items() if v},
        "multi_head_attention_nodes": ops.count("MultiHeadAttention"),
    }


def export_mha_onnx(
    spec: ComponentSpec, out_dir: Path, inputs: dict[str, np.ndarray], num_heads: int, hidden_size: int
) -> dict:
    """`spec.module` (its attention processors already swapped by `use_mha`) -> out_dir/model.onnx: traced with the
    fused MHA nodes, folded with ONNX Runtime's basic level, through the transformer optimizer (bert mode), then
    run on `inputs` and compared with PyTorch. Returns {"fusions", "multi_head_attention_nodes",
    "onnx_vs_torch_max_abs"}."""
    import onnx
    import onnxruntime as ort
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    example = tuple(torch.from_numpy(inputs[s.name]) for s in spec.inputs)
    raw, folded, final = out_dir / "raw.onnx", out_dir / "folded.onnx", out_dir / "model.onnx"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = spec.module(*example).numpy()
        proto = trace_onnx(spec.module.eval(), example, spec, raw, custom_opsets={"com.microsoft": 1})
    onnx.save_model(proto, str(raw))
    del proto
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(raw), opts, providers=["CPUExecutionProvider"])
    info = optimize_transformer(folded, final, "bert", num_heads, hidden_size)
    raw.unlink()
    folded.unlink()
    session = ort.InferenceSession(str(final), providers=["CPUExecutionProvider"])
    got = session.run(None, {s.name: inputs[s.name] for s in spec.inputs})[0]
    return {
        "fusions": info["fusions"],
        "multi_head_attention_nodes": info["multi_head_attention_nodes"],
        "onnx_vs_torch_max_abs": float(np.abs(got - ref).max()),
    }
