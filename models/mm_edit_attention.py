"""MM-EDiT hybrid attention (docs/method.md): replaces the joint attention of an SD3 MM-DiT block.

Image rows:  y_I = eta * LinAttn(Q_I^CF, K_I^SC, V_I^SC) + (1 - eta) * Softmax(Q_I, K_P, V_P)
Prompt rows: y_P = Softmax(Q_P, [K_I; K_P], [V_I; V_P])            (the teacher's exact joint softmax)

The softmax terms use the teacher's plain projections with SD3's QK-norm (`softmax_projections="teacher"`);
ConvFusion and the Spatial Compressor feed only the linear term. Cost is linear in image tokens:
O(N_I d^2 + N_I N_P d + N_P (N_I + N_P) d) per head.

The ONNX export's default (fused) graph computes the same with its two softmax terms as ONNX Runtime's fused
MultiHeadAttention (export/mha.py: MMEDiTMHAExportProcessor, checked against this processor at every export).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .edit_attention import EDiTConfig, edit_qkv, merge_heads, relu_linear_attention


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, _ = x.shape  # (B, N, C) -> (B, H, N, d)
    return x.reshape(b, n, heads, -1).transpose(1, 2)


def _log_partition(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    return torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, H, Nq, 1)


class MMEDiTAttnProcessor:
    """Hybrid linear / softmax joint attention; returns (image_out, prompt_out) like JointAttnProcessor2_0."""

    def __init__(self, config: EDiTConfig):
        self.config = config

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,  # image tokens (B, N_I, C)
        encoder_hidden_states: torch.Tensor,  # prompt tokens (B, N_P, C)
        attention_mask: torch.Tensor | None = None,
        grid_size: tuple[int, int] | None = None,
    ):
        if grid_size is None or encoder_hidden_states is None:
            raise ValueError("MM-EDiT attention needs prompt tokens and grid_size=(h, w)")
        if attention_mask is not None:
            raise ValueError("MM-EDiT attention takes no attention mask")
        heads, n_i, n_p = attn.heads, hidden_states.shape[1], encoder_hidden_states.shape[1]

        # Teacher projections (+ QK-norm) for the softmax terms.
        q_i = _split_heads(attn.to_q(hidden_states), heads)  # (B, H, N_I, d)
        k_i = _split_heads(attn.to_k(hidden_states), heads)
        v_i = _split_heads(attn.to_v(hidden_states), heads)
        q_p = _split_heads(attn.add_q_proj(encoder_hidden_states), heads)  # (B, H, N_P, d)
        k_p = _split_heads(attn.add_k_proj(encoder_hidden_states), heads)
        v_p = _split_heads(attn.add_v_proj(encoder_hidden_states), heads)
        if attn.norm_q is not None:
            q_i, k_i = attn.norm_q(q_i), attn.norm_k(k_i)
        if attn.norm_added_q is not None:
            q_p, k_p = attn.norm_added_q(q_p), attn.norm_added_k(k_p)

        # Image rows: linear image->image term + softmax image->prompt term.
        q_lin, k_lin, v_lin = edit_qkv(attn, hidden_states, grid_size)
        y_lin = relu_linear_attention(q_lin, k_lin, v_lin, self.config.eps, self.config.accumulate_fp32)
        y_cross = F.scaled_dot_product_attention(q_i, k_p, v_p)  # (B, H, N_I, d)
        if self.config.eta_mode == "exact":
            # The joint softmax's mass on image keys: quadratic in N_I, for analysis only.
            eta = torch.sigmoid(_log_partition(q_i, k_i) - _log_partition(q_i, k_p))  # (B, H, N_I, 1)
        else:
            eta = n_i / (n_i + n_p)
        y_img = eta * y_lin + (1.0 - eta) * y_cross
        image_out = attn.to_out[1](attn.to_out[0](merge_heads(y_img)))  # (B, N_I, C)

        if attn.context_pre_only:
            # Last SD3 block: the prompt stream ends here and its attention output is discarded.
            return image_out, encoder_hidden_states
        # Prompt rows: exact joint softmax over [image; prompt] keys.
        y_p = F.scaled_dot_product_attention(q_p, torch.cat([k_i, k_p], 2), torch.cat([v_i, v_p], 2))
        return image_out, attn.to_add_out(merge_heads(y_p))  # (B, N_P, C)
