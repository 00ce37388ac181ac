"""An export twin of ConvFusion for ExecuTorch's XNNPACK delegate.

ConvFusion (models/edit_attention.py) normalises its hidden convolution's output with GroupNorm statistics taken on
the token-major view, `var_mean` over tokens and the group's channels: the right layout for PyTorch on a CPU, but
XNNPACK has no variance and takes a mean only as global average pooling (a 4-D tensor over its last two axes), so
those statistics fall to ExecuTorch's portable kernels and split the program into more delegate calls.

`ConvFusionXNNPACK` computes the same function from the same submodules with the statistics as global average
pooling of the (B, G, C/G, h·w) view, two passes like `var_mean` (the mean, then the mean of the squared
deviations), and the affine as broadcast multiply-adds: every operator of it is one XNNPACK takes.
`xnnpack_twin(module, example)` swaps it into every ConvFusion of a transformer for the duration of an export and
checks the twin equal to the reference first (export/coreml_twin.py: `check_twin`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..models.edit_attention import ConvFusion
from .coreml_twin import check_twin


class ConvFusionXNNPACK(nn.Module):
    """ConvFusion with its GroupNorm statistics as global average pooling (same weights, same function)."""

    def __init__(self, reference: ConvFusion):
        super().__init__()
        self.conv_in, self.norm, self.conv_out = reference.conv_in, reference.norm, reference.conv_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, h, w)
        y = self.conv_in(x)  # (B, C/r, h, w)
        b, c, h, w = y.shape
        g = self.norm.num_groups
        yg = y.reshape(b, g, c // g, h * w)  # (B, G, C/r/G, hw)
        mean = yg.mean(dim=(2, 3), keepdim=True)  # (B, G, 1, 1): global average pooling
        d = yg - mean
        var = (d * d).mean(dim=(2, 3), keepdim=True)  # (B, G, 1, 1), biased like GroupNorm
        scale = torch.rsqrt(var + self.norm.eps) * self.norm.weight.view(1, g, c // g, 1)  # (B, G, C/r/G, 1)
        z = F.leaky_relu(d * scale + self.norm.bias.view(1, g, c // g, 1))  # (B, G, C/r/G, hw)
        return self.conv_out(z.reshape(b, c, h, w))  # (B, C, h, w)


@contextlib.contextmanager
def xnnpack_twin(module: nn.Module, example: tuple[torch.Tensor, ...]):
    """Within the block, every ConvFusion of `module` is its XNNPACK twin; yields the twin report (None without
    ConvFusion). RuntimeError before yielding if the twin's output differs from the reference's beyond TWIN_RTOL."""
    owners = [(m, name) for m in module.modules() for name, c in m.named_children() if isinstance(c, ConvFusion)]
    if not owners:
        yield None
        return
    with torch.no_grad():
        reference = module(*example)
    originals = [getattr(m, name) for m, name in owners]
    try:
        for (m, name), fusion in zip(owners, originals):
            setattr(m, name, ConvFusionXNNPACK(fusion))
        yield check_twin(module, example, reference, len(owners), label="the XNNPACK twin of ConvFusion")
    finally:
        for (m, name), fusion in zip(owners, originals):
            setattr(m, name, fusion)
