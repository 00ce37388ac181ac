"""An export twin of EDiT's linear compressed self-attention for the Apple Neural Engine.

The reference processor (models/edit_attention.py) is written for PyTorch on CPU / GPU: token-major (B, N, C)
tensors, linear layers, head views made by reshape + transpose. The Neural Engine prefers what
apple/ml-stable-diffusion's ANE-optimised transformer uses: channels-first (B, C, 1, S) tensors (the last axis is
the one the ANE keeps contiguous and 64-byte aligned), 1x1 convolutions instead of linear layers, and heads split
into separate small matmuls instead of one batched (B, H, N, d) matmul with a transpose.

`EDiTAttnProcessorANE` computes the same function from the same weights (the linear weights are viewed as 1x1
convolution kernels, nothing is copied or re-trained). `ane_twin(module)` swaps it into every EDiT self-attention
of a transformer for the duration of a conversion and checks the twin equal to the reference first
(`check_twin`): a twin that drifts from the model it claims to be is refused before conversion.

MM-EDiT (SD3) keeps its reference processor: its joint softmax branches dominate the graph and have no twin here.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..models.edit_attention import EDiTAttnProcessor, EDiTConfig

logger = logging.getLogger(__name__)

TWIN_RTOL = 1e-4  # max |twin - reference| / max |reference| allowed in fp32 (summation order differs)


def _conv1x1(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """A linear layer applied to (B, C_in, 1, S) as a 1x1 convolution with the same weight (a view)."""
    return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)


class EDiTAttnProcessorANE:
    """EDiT self-attention in the (B, C, 1, S) layout with 1x1 convolutions and per-head matmuls."""

    def __init__(self, config: EDiTConfig):
        self.config = config

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        attention_mask=None,
        grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if grid_size is None or encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("EDiTAttnProcessorANE: self-attention over image tokens with grid_size=(h, w)")
        b, n, c = hidden_states.shape
        h, w = grid_size
        heads = attn.heads
        x = hidden_states.transpose(1, 2).reshape(b, c, 1, n)  # (B, C, 1, N): channels first
        grid = x.reshape(b, c, h, w)  # (B, C, h, w)
        xz = x  # X + Z, the queries' input
        fusion = getattr(attn, "conv_fusion", None)  # None: no ConvFusion (EDiTConfig.convfusion == "off")
        if fusion is not None:
            z = fusion.conv_in(grid)  # (B, C/r, h, w)
            z = F.group_norm(z, fusion.norm.num_groups, fusion.norm.weight, fusion.norm.bias, fusion.norm.eps)
            z = fusion.conv_out(F.leaky_relu(z))  # (B, C, h, w)
            xz = x + z.reshape(b, c, 1, n)
        q = F.relu(_conv1x1(xz, attn.to_q))  # (B, C, 1, N)
        k = attn.k_compressor(_conv1x1(x, attn.to_k).reshape(b, -1, h, w))  # (B, C, h', w')
        v = attn.v_compressor(_conv1x1(x, attn.to_v).reshape(b, -1, h, w))
        m = k.shape[-2] * k.shape[-1]
        k = F.relu(k).reshape(b, -1, 1, m)  # (B, C, 1, M)
        v = v.reshape(b, -1, 1, m)
        ones = torch.ones_like(v[:, :1])  # (B, 1, 1, M): the pad-V-with-ones row gives the denominator
        outs = []
        for q_h, k_h, v_h in zip(q.chunk(heads, 1), k.chunk(heads, 1), v.chunk(heads, 1)):  # (B, d, 1, *)
            d = q_h.shape[1]
            v1 = torch.cat([v_h, ones], 1).reshape(b, d + 1, m)  # (B, d+1, M)
            kv = torch.matmul(v1, k_h.reshape(b, d, m).transpose(1, 2) * (1.0 / m))  # (B, d+1, d): [S | z]^T
            out = torch.matmul(kv, q_h.reshape(b, d, n))  # (B, d+1, N)
            outs.append(out[:, :d] / (out[:, d:] + self.config.eps))  # (B, d, N)
        y = torch.cat(outs, 1).reshape(b, c, 1, n)  # (B, C, 1, N)
        y = _conv1x1(y, attn.to_out[0])
        return attn.to_out[1](y.reshape(b, c, n).transpose(1, 2))  # (B, N, C)


def edit_attentions(module: nn.Module) -> list:
    """The diffusers Attention modules of `module` that run EDiT's reference self-attention processor."""
    return [m for m in module.modules() if isinstance(getattr(m, "processor", None), EDiTAttnProcessor)]


@contextlib.contextmanager
def ane_twin(module: nn.Module, example: tuple[torch.Tensor, ...]):
    """Within the block, every EDiT self-attention of `module` runs the ANE twin; yields the twin report.

    Before yielding, the module's output with the twins is checked against its output with the reference
    processors on `example`: RuntimeError if they differ by more than TWIN_RTOL (relative to the output's range).
    """
    attns = edit_attentions(module)
    if not attns:
        yield None
        return
    with torch.no_grad():
        reference = module(*example)
    originals = [a.processor for a in attns]
    try:
        for a in attns:
            a.processor = EDiTAttnProcessorANE(a.processor.config)
        report = check_twin(module, example, reference, len(attns))
        yield report
    finally:
        for a, p in zip(attns, originals):
            a.processor = p


def check_twin(
    module: nn.Module, example, reference, layers: int, label: str = "the ANE twin of EDiT attention"
) -> dict:
    """`module` (its twins swapped in) on `example` against `reference`, its output with the reference layers:
    RuntimeError beyond TWIN_RTOL of the output's range; returns the report recorded in the package."""
    with torch.no_grad():
        twin = module(*example)
    ref = reference if torch.is_tensor(reference) else reference[0]
    got = twin if torch.is_tensor(twin) else twin[0]
    scale = float(ref.abs().max()) or 1.0
    err = float((got - ref).abs().max())
    if not err <= TWIN_RTOL * scale:
        raise RuntimeError(
            f"{label} differs from the reference: max |diff| {err:.3e} "
            f"(output range {scale:.3e}, allowed {TWIN_RTOL:.0e} relative)"
        )
    logger.info("%s: %d layers, max |twin - reference| %.2e", label, layers, err)
    return {"layers": layers, "max_abs_diff": err, "relative": err / scale}
