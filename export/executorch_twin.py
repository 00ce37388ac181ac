"""Export twins of ConvFusion and of the normalisation layers for ExecuTorch's XNNPACK delegate.

ConvFusion (models/edit_attention.py) normalises its hidden convolution's output with GroupNorm statistics taken on
the token-major view, `var_mean` over tokens and the group's channels: the right layout for PyTorch on a CPU, but
XNNPACK has no variance and takes a mean only as global average pooling (a 4-D tensor over its last two axes), so
those statistics fall to ExecuTorch's portable kernels and split the program into more delegate calls.

`ConvFusionXNNPACK` computes the same function from the same submodules with the statistics as global average
pooling of the (B, G, C/G, h·w) view, two passes like `var_mean` (the mean, then the mean of the squared
deviations), and the affine as broadcast multiply-adds on the convolution's own (B, C, h, w) output: every operator
of it is one XNNPACK takes, with fp32 or with dynamically quantized int8 convolutions.

XNNPACK in ExecuTorch 1.5.1 has no LayerNorm or GroupNorm either, and diffusers' RMSNorm and T5's layer norm take
their mean over the last axis only: all of them ran on the portable kernels, each splitting the program into one
more delegate call (tiny SD3 MM-EDiT: 14 of them in 2 blocks; the VAE decoder: 22). `LayerNormXNNPACK`,
`RMSNormXNNPACK` and `GroupNormXNNPACK` take their statistics the same way, as global average pooling of a
(M, 1, D, 1) or (B, G, C/G, H·W) view.

`xnnpack_twin(module, example)` swaps the twins into a module for the duration of an export and checks the module
equal to the reference first (export/coreml_twin.py: `check_twin`).
"""

from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.nn.functional as F
from diffusers.models.normalization import RMSNorm
from torch import nn
from transformers.models.t5.modeling_t5 import T5LayerNorm

from ..models.edit_attention import ConvFusion, grid_to_tokens
from .coreml_twin import check_twin


class ConvFusionXNNPACK(nn.Module):
    """ConvFusion with its GroupNorm statistics as global average pooling (same weights, same function)."""

    def __init__(self, reference: ConvFusion):
        super().__init__()
        self.conv_in, self.norm, self.conv_out = reference.conv_in, reference.norm, reference.conv_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, h, w) -> Z: (B, N, C)
        # The identity pooling puts x in XNNPACK's NHWC layout before the convolution. With a dynamically quantized
        # conv_in (int8 packages), XNNPACK's layout pass (ExecuTorch 1.5.1) otherwise walks from the int8 input
        # back through the graph to its first node, the (B, N, C) tokens, and fails to make that 3-D tensor NHWC.
        y = self.conv_in(F.avg_pool2d(x, 1))  # (B, C/r, h, w)
        b, c, h, w = y.shape
        g = self.norm.num_groups
        yg = y.reshape(b, g, c // g, h * w)  # (B, G, C/r/G, hw): a view for the statistics only
        mean = yg.mean(dim=(2, 3), keepdim=True)  # (B, G, 1, 1): global average pooling
        d = yg - mean
        var = (d * d).mean(dim=(2, 3), keepdim=True)  # (B, G, 1, 1), biased like GroupNorm
        scale = torch.rsqrt(var + self.norm.eps) * self.norm.weight.view(1, g, c // g, 1)  # (B, G, C/r/G, 1)
        shift = self.norm.bias.view(1, g, c // g, 1) - mean * scale  # (B, G, C/r/G, 1)
        # The affine applies to y itself, per channel: a reshape of the activations between here and conv_out
        # breaks XNNPACK's dynamically quantized convolution (its shapes fail to propagate at run time).
        z = F.leaky_relu(y * scale.reshape(b, c, 1, 1) + shift.reshape(b, c, 1, 1))  # (B, C/r, h, w)
        return grid_to_tokens(self.conv_out(z))  # (B, N, C), as the reference returns Z


def _mean_last(x: torch.Tensor) -> torch.Tensor:
    """The mean over the last axis, keepdim, as global average pooling of a (M, 1, D, 1) view."""
    return x.reshape(-1, 1, x.shape[-1], 1).mean(dim=(2, 3), keepdim=True).reshape(*x.shape[:-1], 1)


class LayerNormXNNPACK(nn.Module):
    """nn.LayerNorm over the last axis with its statistics as global average pooling (same weights)."""

    def __init__(self, reference: nn.LayerNorm):
        super().__init__()
        self.weight, self.bias, self.eps = reference.weight, reference.bias, reference.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., D)
        d = x - _mean_last(x)
        y = d * torch.rsqrt(_mean_last(d * d) + self.eps)  # biased variance, as LayerNorm
        y = y * self.weight if self.weight is not None else y
        return y + self.bias if self.bias is not None else y


class RMSNormXNNPACK(nn.Module):
    """diffusers' RMSNorm and T5's layer norm (fp32 weights) with the mean of squares as global average pooling (same
    weights)."""

    def __init__(self, reference: nn.Module):
        super().__init__()
        self.weight, self.bias = reference.weight, getattr(reference, "bias", None)
        self.eps = reference.eps if isinstance(reference, RMSNorm) else reference.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., D)
        y = x * torch.rsqrt(_mean_last(x * x) + self.eps)
        y = y * self.weight if self.weight is not None else y
        return y + self.bias if self.bias is not None else y


class GroupNormXNNPACK(nn.Module):
    """nn.GroupNorm of a (B, C, ...) tensor with its statistics as global average pooling of the (B, G, C/G, rest)
    view (same weights): the VAE's GroupNorms."""

    def __init__(self, reference: nn.GroupNorm):
        super().__init__()
        self.groups, self.eps = reference.num_groups, reference.eps
        self.weight, self.bias = reference.weight, reference.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) or (B, C, N)
        b, c, g = x.shape[0], x.shape[1], self.groups
        xg = x.reshape(b, g, c // g, -1)  # (B, G, C/G, HW)
        d = xg - xg.mean(dim=(2, 3), keepdim=True)
        y = d * torch.rsqrt((d * d).mean(dim=(2, 3), keepdim=True) + self.eps)  # biased, as GroupNorm
        if self.weight is not None:
            y = y * self.weight.view(1, g, c // g, 1) + self.bias.view(1, g, c // g, 1)
        return y.reshape(x.shape)


def _twin_of(child: nn.Module) -> nn.Module | None:
    if isinstance(child, ConvFusion):
        return ConvFusionXNNPACK(child)
    if isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1:
        return LayerNormXNNPACK(child)
    if isinstance(child, (RMSNorm, T5LayerNorm)):  # the same function; T5's names its eps variance_epsilon
        return RMSNormXNNPACK(child)
    if isinstance(child, nn.GroupNorm):
        return GroupNormXNNPACK(child)
    return None


def _swaps(module: nn.Module):
    """(owner, attribute, layer, its twin) for every layer that has a twin, not looking inside those layers (a
    ConvFusion's own GroupNorm is part of its twin)."""
    for name, child in module.named_children():
        twin = _twin_of(child)
        if twin is not None:
            yield module, name, child, twin
        else:
            yield from _swaps(child)


@contextlib.contextmanager
def _swapped(module: nn.Module):
    """Within the block, every layer of `module` that has a twin is its twin; yields the swaps."""
    swaps = list(_swaps(module))
    try:
        for m, name, _, twin in swaps:
            setattr(m, name, twin)
        yield swaps
    finally:
        for m, name, original, _ in swaps:
            setattr(m, name, original)


def check_xnnpack_twin(module: nn.Module, example: tuple[torch.Tensor, ...]) -> dict | None:
    """`module` with its twins against itself without them on `example` (export/coreml_twin.py: `check_twin`):
    RuntimeError beyond TWIN_RTOL; the report, with the count of each kind of twin (None when it has none)."""
    if next(_swaps(module), None) is None:
        return None
    with torch.no_grad():
        reference = module(*example)
    with _swapped(module) as swaps:
        report = check_twin(module, example, reference, len(swaps), label="the module with its XNNPACK twins")
    kinds = Counter(type(twin).__name__ for *_, twin in swaps)
    return {**report, "kinds": dict(sorted(kinds.items()))}


@contextlib.contextmanager
def xnnpack_twin(module: nn.Module, example: tuple[torch.Tensor, ...], checked_on: nn.Module | None = None):
    """Within the block, every ConvFusion, LayerNorm and RMSNorm of `module` is its XNNPACK twin; yields the twin
    report (None when it has none of them). Checked first (RuntimeError beyond TWIN_RTOL) on `checked_on`, the
    float module a quantized `module` was made from (default: `module` itself). The twins rewrite float operators
    only, and a quantized module cannot judge them: its activations, quantized to int8 at run time, turn the
    twins' last-bit differences into whole quantization steps (true-size PixArt EDiT at 512², int8-dynamic:
    6.9e-3 of an output range of 2.3, where the fp32 module differs by 8e-7)."""
    report = check_xnnpack_twin(module if checked_on is None else checked_on, example)
    with _swapped(module):
        yield report
