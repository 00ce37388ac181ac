"""EDiT linear compressed attention and MM-EDiT hybrid attention against naive reference formulations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

from edit_mobile.models.edit_attention import (
    EDiTAttnProcessor,
    EDiTConfig,
    add_edit_layers,
    edit_qkv,
    relu_linear_attention,
)
from edit_mobile.models.mm_edit_attention import MMEDiTAttnProcessor

torch.manual_seed(0)


def naive_linear_attention(q, k, v, eps):
    """The same formula with the (N x M) attention matrix materialised, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    a = q @ k.transpose(-1, -2)  # (B, H, N, M)
    m = k.shape[-2]
    return ((a @ v) / m) / (a.sum(-1, keepdim=True) / m + eps)


def randomize(module: torch.nn.Module) -> None:
    """Give the freshly initialised (zero / constant) EDiT layers random weights so every path is exercised."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)


def self_attention(dim=32, heads=2, config=None):
    attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=True)
    add_edit_layers(attn, config or EDiTConfig())
    attn.set_processor(EDiTAttnProcessor(config or EDiTConfig()))
    return attn.eval()


@pytest.mark.parametrize("grid", [(8, 8), (7, 5), (9, 9)])
def test_linear_attention_kernel_matches_naive(grid):
    b, h, d = 3, 2, 16
    n = grid[0] * grid[1]
    q, k, v = (
        F.relu(torch.randn(b, h, n, d)),
        F.relu(torch.randn(b, h, n // 4 + 1, d)),
        torch.randn(b, h, n // 4 + 1, d),
    )
    y = relu_linear_attention(q, k, v, eps=1e-6)
    assert torch.allclose(y.double(), naive_linear_attention(q, k, v, 1e-6), atol=1e-5)


def naive_conv_fusion(cf, g):
    """docs/method.md's ConvFusion with explicit convolutions on the (B, C, h, w) grid (dense or separable)."""
    if isinstance(cf.conv_in, torch.nn.Sequential):  # depthwise 3x3, then 1x1 C -> C/r
        dw, pw = cf.conv_in
        hidden = F.conv2d(F.conv2d(g, dw.weight, dw.bias, padding=1, groups=g.shape[1]), pw.weight, pw.bias)
    else:
        hidden = F.conv2d(g, cf.conv_in.weight, cf.conv_in.bias, padding=1)
    return F.conv2d(F.leaky_relu(cf.norm(hidden)), cf.conv_out.weight, cf.conv_out.bias)


@pytest.mark.parametrize("convfusion", ["dense", "separable", "off"])
@pytest.mark.parametrize("grid", [(8, 8), (7, 5), (5, 9)])
def test_edit_processor_matches_naive_formula(grid, convfusion):
    attn = self_attention(config=EDiTConfig(convfusion=convfusion))
    randomize(attn)
    x = torch.randn(2, grid[0] * grid[1], 32)
    with torch.no_grad():
        y = attn(x, grid_size=grid)
        # Reference: docs/method.md written out with explicit convolutions on the (B, C, h, w) grid.
        g = x.transpose(1, 2).reshape(2, 32, *grid)
        z = torch.zeros_like(g) if convfusion == "off" else naive_conv_fusion(attn.conv_fusion, g)
        q = F.relu(attn.to_q(x + z.flatten(2).transpose(1, 2)))

        def compress(t, conv):
            t = t.transpose(1, 2).reshape(2, 32, *grid)
            return (
                F.conv2d(t, conv.conv.weight, conv.conv.bias, stride=2, padding=1, groups=32).flatten(2).transpose(1, 2)
            )

        k = F.relu(compress(attn.to_k(x), attn.k_compressor))
        v = compress(attn.to_v(x), attn.v_compressor)
        assert k.shape[1] == ((grid[0] + 1) // 2) * ((grid[1] + 1) // 2)
        heads = lambda t: t.reshape(2, t.shape[1], 2, 16).transpose(1, 2)  # noqa: E731
        ref = naive_linear_attention(heads(q), heads(k), heads(v), 1e-6).float()
        ref = attn.to_out[0](ref.transpose(1, 2).reshape(2, -1, 32))
    assert torch.allclose(y, ref, atol=1e-5), (y - ref).abs().max()


def test_fresh_conversion_queries_equal_teacher_relu_wq():
    attn = self_attention()
    x = torch.randn(2, 6 * 7, 32)
    with torch.no_grad():
        q, _, _ = edit_qkv(attn, x, (6, 7))
        expected = F.relu(attn.to_q(x)).reshape(2, 42, 2, 16).transpose(1, 2)
    assert torch.equal(q, expected)


def test_true_fp16_large_activations_stay_finite():
    """64x64 grid, activations of scale 30, computed in torch.half: finite and within 1e-2 of fp32."""
    attn = self_attention(dim=64, heads=4)
    randomize(attn)
    x = torch.randn(1, 64 * 64, 64) * 30
    with torch.no_grad():
        y32 = attn(x, grid_size=(64, 64))
        y16 = attn.half()(x.half(), grid_size=(64, 64))
    assert y16.dtype == torch.float16
    assert torch.isfinite(y16).all()
    rel = (y16.float() - y32).norm() / y32.norm()
    assert rel < 1e-2, rel


def test_fp16_without_mean_normalisation_would_overflow():
    """Why the means matter: the same accumulation as plain sums over 1024 tokens overflows fp16."""
    k = torch.full((1, 1, 1024, 16), 30.0, dtype=torch.float16)
    v = torch.full((1, 1, 1024, 16), 30.0, dtype=torch.float16)
    assert not torch.isfinite(k.transpose(-1, -2) @ v).all()
    q = torch.ones(1, 1, 4, 16, dtype=torch.float16)
    assert torch.isfinite(relu_linear_attention(q, k, v, 1e-6, accumulate_fp32=False)).all()


def test_zero_feature_rows_give_zero_output_not_nan():
    # A ReLU feature map is exactly zero for a token whose projections are all negative: then q_i . S = 0 and
    # q_i . z = 0, and only the "+ eps" in the denominator turns 0/0 (NaN) into the intended 0 for that row.
    b, h, n, m, d = 1, 2, 12, 5, 8
    q, k, v = F.relu(torch.randn(b, h, n, d)), F.relu(torch.randn(b, h, m, d)), torch.randn(b, h, m, d)
    q[:, :, 3] = 0.0  # one query token with an all-zero feature map
    y = relu_linear_attention(q, k, v, eps=1e-6)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, :, 3], torch.zeros_like(y[:, :, 3]))
    others = [i for i in range(n) if i != 3]  # the other rows are untouched by the zero row
    assert torch.allclose(y[:, :, others].double(), naive_linear_attention(q, k, v, 1e-6)[:, :, others], atol=1e-5)
    # All keys zero (z = 0, S = 0): every row is 0/eps = 0.
    y0 = relu_linear_attention(q, torch.zeros_like(k), v, eps=1e-6)
    assert torch.isfinite(y0).all() and torch.equal(y0, torch.zeros_like(y0))


def test_true_fp16_kernel_long_sequence_stays_finite_and_accurate():
    """The kernel itself in true fp16 arithmetic (accumulate_fp32=False) over M = 4096 keys at activation scale 10.

    With sums instead of means, z = sum_j k_j reaches ~1.6e4 and q . z ~ 1e6 > 65504 (fp16 max): the output becomes
    NaN (inf / inf) or 0 (x / inf). The means keep every intermediate at activation scale (docs/method.md).
    torch's CPU fp16 matmul rounds its result to fp16, so the overflow is not hidden (unlike ONNX Runtime's CPU).
    """
    g = torch.Generator().manual_seed(0)
    b, h, n, m, d = 1, 2, 256, 4096, 16
    q = F.relu(torch.randn(b, h, n, d, generator=g) * 10).half()
    k = F.relu(torch.randn(b, h, m, d, generator=g) * 10).half()
    v = (torch.randn(b, h, m, d, generator=g) * 10).half()
    y = relu_linear_attention(q, k, v, 1e-6, accumulate_fp32=False)
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all()
    # Also accurate, so an overflow that ends as 0 (finite but wrong) fails too. Reference: the same fp16 inputs in
    # float64. 10 fp16 epsilons (~1e-2) of relative L2 error; 4e-4 measured.
    ref = naive_linear_attention(q, k, v, 1e-6)
    rel = float((y.double() - ref).norm() / ref.norm())
    assert rel < 10 * torch.finfo(torch.float16).eps, rel


def joint_attention(dim=32, heads=2, context_pre_only=False):
    attn = Attention(
        query_dim=dim,
        cross_attention_dim=None,
        added_kv_proj_dim=dim,
        dim_head=dim // heads,
        heads=heads,
        out_dim=dim,
        context_pre_only=context_pre_only,
        bias=True,
        qk_norm="rms_norm",
        eps=1e-6,
        processor=JointAttnProcessor2_0(),
    )
    return attn.eval()


def reference_mm_image_rows(attn, img, txt, grid, eta_mode, eps=1e-6):
    """MM-EDiT image rows written from docs/method.md: eta * linear(image) + (1 - eta) * softmax(image -> prompt),
    through to_out. The softmax term uses the teacher's projections with SD3's QK-norm; the linear term the EDiT
    feature maps (edit_qkv, checked against explicit convolutions above) and the naive float64 formula."""
    b, n_i, c = img.shape
    heads = attn.heads
    d = c // heads
    split = lambda t: t.reshape(b, t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    q_i, k_i = attn.norm_q(split(attn.to_q(img))), attn.norm_k(split(attn.to_k(img)))
    k_p = attn.norm_added_k(split(attn.add_k_proj(txt)))
    v_p = split(attn.add_v_proj(txt))
    s_ip = (q_i @ k_p.transpose(-1, -2)) / d**0.5
    cross = torch.softmax(s_ip, -1) @ v_p
    lin = naive_linear_attention(*edit_qkv(attn, img, grid), eps).float()
    if eta_mode == "exact":  # the joint softmax's probability mass on image keys, per row
        z_i = torch.exp((q_i @ k_i.transpose(-1, -2)) / d**0.5).sum(-1, keepdim=True)
        z_p = torch.exp(s_ip).sum(-1, keepdim=True)
        eta = z_i / (z_i + z_p)
    else:  # token count: N_I / (N_I + N_P)
        eta = n_i / (n_i + txt.shape[1])
    return attn.to_out[0]((eta * lin + (1 - eta) * cross).transpose(1, 2).reshape(b, n_i, c))


def mm_edit_attention(attn, config):
    """Turn a teacher joint attention into MM-EDiT with random EDiT layers (so the linear term is not at init)."""
    add_edit_layers(attn, config)
    randomize(attn.conv_fusion), randomize(attn.k_compressor), randomize(attn.v_compressor)
    attn.set_processor(MMEDiTAttnProcessor(config))
    return attn


@pytest.mark.parametrize("eta_mode", ["token_count", "exact"])
def test_mm_edit_prompt_rows_exact_and_image_rows_follow_formula(eta_mode):
    config = EDiTConfig(eta_mode=eta_mode)
    attn = joint_attention()
    img, txt, grid = torch.randn(2, 5 * 6, 32), torch.randn(2, 7, 32), (5, 6)
    with torch.no_grad():
        teacher_img, teacher_txt = attn(img, encoder_hidden_states=txt)
        mm_edit_attention(attn, config)
        y_img, y_txt = attn(img, encoder_hidden_states=txt, grid_size=grid)

        # Prompt rows: the teacher's exact joint softmax.
        assert torch.allclose(y_txt, teacher_txt, atol=1e-6)
        ref = reference_mm_image_rows(attn, img, txt, grid, eta_mode)
    assert torch.allclose(y_img, ref, atol=1e-5), (y_img - ref).abs().max()


@pytest.mark.parametrize("eta_mode", ["token_count", "exact"])
def test_mm_edit_context_pre_only_block_returns_image_rows(eta_mode):
    # SD3's last block (context_pre_only) has no prompt output projection; its image rows must still be the hybrid
    # formula (and a processor that returned, say, only the softmax term, or skipped to_out, must fail here).
    config = EDiTConfig(eta_mode=eta_mode)
    attn = mm_edit_attention(joint_attention(context_pre_only=True), config)
    assert not hasattr(attn, "to_add_out") or attn.to_add_out is None
    img, txt, grid = torch.randn(1, 16, 32), torch.randn(1, 3, 32), (4, 4)
    with torch.no_grad():
        y_img, _ = attn(img, encoder_hidden_states=txt, grid_size=grid)
        ref = reference_mm_image_rows(attn, img, txt, grid, eta_mode)
    assert y_img.shape == (1, 16, 32)
    assert torch.allclose(y_img, ref, atol=1e-5), (y_img - ref).abs().max()


def test_config_rejects_unknown_eta_mode():
    with pytest.raises(ValueError, match="eta_mode"):
        EDiTConfig(eta_mode="guess")


class _OnGrid(torch.nn.Module):
    """An EDiT self-attention called on a fixed grid: the (module, example) form the export twins take."""

    def __init__(self, attn, grid):
        super().__init__()
        self.attn, self.grid = attn, grid

    def forward(self, x):
        return self.attn(x, grid_size=self.grid)


@pytest.mark.parametrize("convfusion", ["dense", "separable", "off"])
def test_export_twins_follow_every_convfusion_kind(convfusion):
    """The Core ML (ANE) twin and the ExecuTorch (XNNPACK) twin compute each ConvFusion kind as the reference does:
    both check themselves against it on entry (RuntimeError beyond TWIN_RTOL)."""
    from edit_mobile.export.coreml_twin import ane_twin
    from edit_mobile.export.executorch_twin import xnnpack_twin

    attn = self_attention(config=EDiTConfig(convfusion=convfusion, convfusion_groups=2))
    randomize(attn)
    module, example = _OnGrid(attn, (6, 7)).eval(), (torch.randn(2, 42, 32),)
    with ane_twin(module, example) as report:
        assert report["layers"] == 1 and report["relative"] <= 1e-4
    with xnnpack_twin(module, example) as report:
        expected = {} if convfusion == "off" else {"ConvFusionXNNPACK": 1}
        assert (report or {}).get("kinds", {}) == expected
