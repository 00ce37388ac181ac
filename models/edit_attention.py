"""EDiT linear compressed attention (arXiv 2503.16726, docs/method.md), as diffusers attention processors.

The new layers (ConvFusion, Spatial Compressor) are attached to diffusers' own `Attention` module, so the
teacher's `to_q / to_k / to_v / to_out` weights stay where they are and the model is still a diffusers model.
The processor needs the latent grid (h, w) to run its convolutions; the EDiT transformer classes pass it as the
`grid_size` attention kwarg.

Shapes: B batch, N = h*w image tokens, M = ceil(h/s)*ceil(w/s) compressed tokens, C channels, H heads, d = C/H.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn


@dataclass(frozen=True)
class EDiTConfig:
    """Choices the paper leaves open; saved inside the transformer's config.json as `edit_config`."""

    convfusion_reduction: int = 4  # r: ConvFusion's 3x3 conv maps C -> C/r channels
    # "dense": that 3x3 conv (the paper's); "separable": a depthwise 3x3 conv, then a 1x1 conv C -> C/r (about 9x
    # fewer multiply-adds); "off": no ConvFusion, the queries are W_q X (docs/shapes.md: what each costs in quality)
    convfusion: str = "dense"
    convfusion_groups: int = 8  # GroupNorm groups inside ConvFusion (clipped to divide C/r)
    kv_stride: int = 2  # Spatial Compressor: depthwise 3x3 conv stride, M ~ N / stride^2
    eps: float = 1e-6  # linear attention denominator epsilon (kept explicit for fp16 safety)
    accumulate_fp32: bool = True  # compute S = mean K^T V and z = mean K in fp32 even in fp16 models
    # MM-EDiT only
    eta_mode: str = "token_count"  # "token_count": eta = N_I/(N_I+N_P); "exact": per-row softmax mass on images
    softmax_projections: str = "teacher"  # "teacher": softmax terms use plain W_q/W_k/W_v (+QK-norm) of the teacher
    convert_dual_attention: bool = True  # SD3.5: turn the image-only second attention (attn2) into EDiT too

    def __post_init__(self):
        if self.convfusion_reduction < 1 or self.kv_stride < 1:
            raise ValueError("convfusion_reduction and kv_stride must be >= 1")
        if self.convfusion not in ("dense", "separable", "off"):
            raise ValueError(f"convfusion must be 'dense', 'separable' or 'off', got {self.convfusion!r}")
        if self.eta_mode not in ("token_count", "exact"):
            raise ValueError(f"eta_mode must be 'token_count' or 'exact', got {self.eta_mode!r}")
        if self.softmax_projections != "teacher":
            raise ValueError(f"softmax_projections supports only 'teacher', got {self.softmax_projections!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> EDiTConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


def _divisor_at_most(n: int, k: int) -> int:
    return max(g for g in range(1, min(n, k) + 1) if n % g == 0)


class ConvFusion(nn.Module):
    """Z = Conv1x1_{C/r->C}(LeakyReLU(GroupNorm(Conv3x3_{C->C/r}(X)))): local context added to the queries.

    separable=True factors the 3x3 conv into a depthwise 3x3 conv (C -> C) and a 1x1 conv (C -> C/r).
    """

    def __init__(self, dim: int, reduction: int, groups: int, separable: bool = False):
        super().__init__()
        hidden = max(dim // reduction, 1)
        if separable:
            depthwise = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.conv_in = nn.Sequential(depthwise, nn.Conv2d(dim, hidden, 1))
        else:
            self.conv_in = nn.Conv2d(dim, hidden, 3, padding=1)
        self.norm = nn.GroupNorm(_divisor_at_most(hidden, groups), hidden)
        self.conv_out = nn.Conv2d(hidden, dim, 1)
        # Zero last conv: a freshly converted model computes exactly the teacher's W_q X.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the (B, C, h, w) grid, channels-last from tokens_to_grid. Returns Z as tokens, (B, N, C)."""
        y = self.conv_in(x)  # (B, C/r, h, w), channels-last like x
        b, c, h, w = y.shape
        g = self.norm.num_groups
        # GroupNorm written out: torch's ONNX exporter builds nn.GroupNorm's reshapes from run-time shapes, which
        # leaves every later shape in the graph unknown (and then wraps PixArt's final squeeze in an invalid If).
        # It is computed on the token-major view (channels last) so that no NCHW copy is made on the way.
        yt = y.permute(0, 2, 3, 1).reshape(b, h * w, g, c // g)  # (B, N, G, C/r/G): a view of y
        var, mean = torch.var_mean(yt, dim=(1, 3), correction=0, keepdim=True)  # (B, 1, G, 1), biased like GroupNorm
        # Normalisation and affine folded into one per-channel scale and shift: a single pass (addcmul) over y.
        scale = torch.rsqrt(var + self.norm.eps) * self.norm.weight.view(g, c // g)  # (B, 1, G, C/r/G)
        shift = self.norm.bias.view(g, c // g) - mean * scale
        yt = F.leaky_relu(torch.addcmul(shift, yt, scale), inplace=True)  # (B, N, G, C/r/G)
        # conv_out is a 1x1 convolution, i.e. the same linear map of every token: applied to the token-major view
        # it exports as one MatMul. As a Conv, ONNX Runtime's CPU provider would wrap it in NCHWc layout copies
        # (ReorderInput, ReorderOutput): two more (B, N, C) tensors per block, 75 MB each at 2048² (docs/memory.md).
        weight = self.conv_out.weight.view(self.conv_out.out_channels, c)  # (C, C/r, 1, 1) -> (C, C/r)
        return F.linear(yt.reshape(b, h * w, c), weight, self.conv_out.bias)  # (B, N, C)


class SpatialCompressor(nn.Module):
    """Depthwise 3x3 conv, stride s, padding 1: (B, C, h, w) -> (B, C, ceil(h/s), ceil(w/s))."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, stride=stride, padding=1, groups=dim, bias=True)
        # Local average: compressed tokens start as the mean of their neighbourhood.
        nn.init.constant_(self.conv.weight, 1.0 / 9.0)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def tokens_to_grid(x: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(B, N, C) -> (B, C, h, w) as a channels-last view of the same memory: no copy.

    Tokens are stored row by row over the grid, so a contiguous (B, N, C) tensor already is an NHWC image.
    PyTorch's convolutions keep channels-last inputs channels-last, so `grid_to_tokens` turns their outputs back
    into tokens as views too. (A transpose to contiguous NCHW and back costs two strided full-size copies per
    tensor, more than the depthwise convolutions themselves; the ONNX graph gets the same Transpose nodes.)
    """
    b, n, c = x.shape
    return x.reshape(b, grid_size[0], grid_size[1], c).permute(0, 3, 1, 2)


def grid_to_tokens(x: torch.Tensor) -> torch.Tensor:
    b, c = x.shape[:2]  # (B, C, h, w) -> (B, h*w, C): a view when x is channels-last, a copy otherwise
    return x.permute(0, 2, 3, 1).reshape(b, -1, c)


def relu_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, accumulate_fp32: bool = True
) -> torch.Tensor:
    """y_i = (q_i S) / (q_i z + eps), S = mean_j k_j^T v_j, z = mean_j k_j, per head.

    q: (B, H, N, d) and k: (B, H, M, d), already non-negative (ReLU feature map); v: (B, H, M, d).
    Means instead of sums keep S and z at activation scale, so fp16 does not overflow on long sequences.
    V is padded with a column of ones (LiteMLA / Sana trick): one matmul yields numerator and denominator.
    q, k, v may be head views of token-major (B, N, C) tensors (see `split_heads`): matmul reads them in place.
    """
    out_dtype = q.dtype
    if accumulate_fp32 and q.dtype != torch.float32:  # fp32 inputs need no cast (and no copy)
        q, k, v = q.float(), k.float(), v.float()
    m = k.shape[-2]
    # cat with ones rather than F.pad: the exporter computes F.pad's amounts at run time (unknown shapes).
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, H, M, d+1)
    # Scale K before the sum (not S after it): the mean is what keeps a non-fp32 accumulation finite.
    kv = torch.matmul(k.transpose(-1, -2) * (1.0 / m), v1)  # (B, H, d, d+1): [S | z]
    out = torch.matmul(q, kv)  # (B, H, N, d+1)
    # Divide in place (the matmul's backward does not need its output): no second (B, H, N, d) tensor.
    y = out[..., :-1].div_(out[..., -1:] + eps)  # (B, H, N, d), a view of out
    return y.to(out_dtype)


def add_edit_layers(attn: Attention, config: EDiTConfig) -> None:
    """Attach ConvFusion and the Spatial Compressors to a diffusers `Attention` module (weights untouched)."""
    dim = attn.to_q.in_features
    if config.convfusion != "off":
        separable = config.convfusion == "separable"
        attn.conv_fusion = ConvFusion(dim, config.convfusion_reduction, config.convfusion_groups, separable)
    attn.k_compressor = SpatialCompressor(attn.to_k.out_features, config.kv_stride)
    attn.v_compressor = SpatialCompressor(attn.to_v.out_features, config.kv_stride)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape  # (B, N, C) -> (B, H, N, d): a view of a contiguous x, no copy
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def edit_qkv(attn: Attention, x: torch.Tensor, grid_size: tuple[int, int]):
    """EDiT feature maps of image tokens x (B, N, C): Q (B,H,N,d), K (B,H,M,d) non-negative, V (B,H,M,d).

    Everything stays token-major (channels-last on the grid): the grid and head splits are views, not copies.
    """
    x = x.contiguous()  # the grid view needs (B, N, C) memory order; a no-op for the usual contiguous input
    grid = tokens_to_grid(x, grid_size)  # (B, C, h, w), channels-last view of x
    # The residual add and the ReLUs run in place on fresh conv / linear outputs, whose backward never reads them:
    # at 2048² every avoided (B, N, C) temporary saves a 75 MB allocation (and its page faults).
    fusion = getattr(attn, "conv_fusion", None)  # None: EDiTConfig.convfusion == "off"
    xz = x if fusion is None else fusion(grid).add_(x)  # (B, N, C): X + Z
    q = attn.to_q(xz).relu_()  # (B, N, C)
    k = grid_to_tokens(attn.k_compressor(tokens_to_grid(attn.to_k(x), grid_size))).relu_()  # (B, M, C)
    v = grid_to_tokens(attn.v_compressor(tokens_to_grid(attn.to_v(x), grid_size)))  # (B, M, C)
    return split_heads(q, attn.heads), split_heads(k, attn.heads), split_heads(v, attn.heads)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    b, h, n, d = y.shape  # (B, H, N, d) -> (B, N, H*d)
    return y.transpose(1, 2).reshape(b, n, h * d)


class EDiTAttnProcessor:
    """Linear compressed self-attention over image tokens (replaces a DiT block's self-attention)."""

    def __init__(self, config: EDiTConfig):
        self.config = config

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if grid_size is None:
            raise ValueError("EDiTAttnProcessor needs the latent grid: pass grid_size=(h, w)")
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("EDiT attention is self-attention over image tokens: no context, no mask")
        q, k, v = edit_qkv(attn, hidden_states, grid_size)
        y = relu_linear_attention(q, k, v, self.config.eps, self.config.accumulate_fp32)  # (B, H, N, d)
        return attn.to_out[1](attn.to_out[0](merge_heads(y)))  # (B, N, C)


class GridAwareAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor that accepts (and ignores) the `grid_size` kwarg the EDiT blocks receive."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, grid_size=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
