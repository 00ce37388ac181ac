"""Conversion from diffusers teachers, save / load through the stock pipeline classes, CLI bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel, StableDiffusion3Pipeline

import edit_mobile.models  # noqa: F401  (registers the EDiT classes for diffusers' from_pretrained)
from edit_mobile.cli.main import main as cli
from edit_mobile.models import EDiTPixArtTransformer2DModel, MMEDiTSD3Transformer2DModel
from edit_mobile.models.edit_attention import EDiTConfig
from edit_mobile.models.presets import PRESETS

NEW_LAYERS = ("conv_fusion", "k_compressor", "v_compressor")
CASES = [
    ("tiny-pixart", "edit", PixArtSigmaPipeline, EDiTPixArtTransformer2DModel),
    ("tiny-sd3", "mm-edit", StableDiffusion3Pipeline, MMEDiTSD3Transformer2DModel),
]


@pytest.mark.parametrize(
    "teacher_name,student_cls",
    [("tiny-pixart", EDiTPixArtTransformer2DModel), ("tiny-sd3", MMEDiTSD3Transformer2DModel)],
)
def test_every_teacher_weight_is_copied(teacher_name, student_cls):
    teacher = PRESETS[teacher_name].build().transformer
    student = student_cls.from_teacher(teacher)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in t_state.items():
        assert torch.equal(s_state[key], value), key
    added = set(s_state) - set(t_state)
    assert added and all(any(n in k for n in NEW_LAYERS) for k in added)
    # Only attention changed: every block has the new layers on its self / joint attention.
    assert all(hasattr(b.attn1 if hasattr(b, "attn1") else b.attn, "conv_fusion") for b in student.transformer_blocks)


@pytest.mark.parametrize("convfusion", ["separable", "off"])
def test_cli_convfusion_variant_is_saved_and_loads(tmp_path, convfusion):
    """`convert --convfusion`: the variant's layers are what it says, its config is saved beside the weights, and
    the stock pipeline class loads it back with the same layers."""
    out = tmp_path / convfusion
    assert cli(["convert", "tiny-pixart", "--arch", "edit", "--convfusion", convfusion, "--out", str(out)]) == 0
    student = PixArtSigmaPipeline.from_pretrained(out).transformer
    assert student.edit == EDiTConfig(convfusion=convfusion)
    fusion = [getattr(b.attn1, "conv_fusion", None) for b in student.transformer_blocks]
    if convfusion == "off":
        assert fusion == [None] * len(fusion)
    else:  # depthwise 3x3 (groups = C), then 1x1 C -> C/4
        dw, pw = fusion[0].conv_in
        assert dw.groups == dw.in_channels == dw.out_channels and pw.kernel_size == (1, 1)
        assert pw.out_channels == dw.in_channels // 4


def _generate(pipe, seed=0):
    kwargs = {"clean_caption": False} if isinstance(pipe, PixArtSigmaPipeline) else {}
    return pipe(
        "a red circle",
        num_inference_steps=2,
        height=256,
        width=256,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images


@pytest.mark.parametrize("name,arch,pipe_cls,student_cls", CASES)
def test_converted_pipeline_loads_with_stock_class_and_generates(tiny_dirs, name, arch, pipe_cls, student_cls):
    pipe = pipe_cls.from_pretrained(tiny_dirs[f"{name}-{arch}"])
    assert type(pipe.transformer) is student_cls
    image = _generate(pipe)
    assert image.shape == (1, 256, 256, 3) and np.isfinite(image).all() and image.std() > 0


@pytest.mark.parametrize("name,arch,pipe_cls,student_cls", CASES)
def test_save_load_is_bit_identical(tiny_dirs, tmp_path, name, arch, pipe_cls, student_cls):
    pipe = pipe_cls.from_pretrained(tiny_dirs[f"{name}-{arch}"])
    pipe.save_pretrained(tmp_path / "again")
    again = pipe_cls.from_pretrained(tmp_path / "again")
    a, b = pipe.transformer.state_dict(), again.transformer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.transformer.edit == pipe.transformer.edit
    assert np.array_equal(_generate(pipe), _generate(again))


class _ReferenceEDiTSelfAttention:
    """EDiT self-attention at its conversion init, written from docs/method.md without models/edit_attention.py.

    At init ConvFusion adds exactly zero (its last conv is zero) and each Spatial Compressor is a 3x3 stride-2
    local average with zero padding (weights 1/9, zero bias), i.e. avg_pool2d(3, 2, 1, count_include_pad=True).
    The linear attention is the naive per-head formula with means. diffusers' blocks pass no grid to the processor,
    so it is given here (a closure over the test's latent size).
    """

    def __init__(self, grid: tuple[int, int], eps: float):
        self.grid, self.eps = grid, eps

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        # PixArt's self-attention uses none of Attention's optional paths; if one appeared, this reference (and
        # the EDiT processor, which ignores them too) would silently differ from the teacher's semantics.
        assert encoder_hidden_states is None and attention_mask is None
        assert attn.norm_q is None and attn.group_norm is None and attn.spatial_norm is None
        assert not attn.residual_connection and attn.rescale_output_factor == 1.0
        x = hidden_states  # (B, N, C), tokens row by row over the (h, w) grid
        b, n, c = x.shape
        h, w = self.grid
        assert n == h * w

        def compress(t):  # (B, N, C) -> (B, M, C)
            grid = t.reshape(b, h, w, c).permute(0, 3, 1, 2)
            pooled = F.avg_pool2d(grid, 3, stride=2, padding=1, count_include_pad=True)
            return pooled.flatten(2).transpose(1, 2)

        q = F.relu(attn.to_q(x))
        k = F.relu(compress(attn.to_k(x)))
        v = compress(attn.to_v(x))
        d = c // attn.heads
        heads = []
        for i in range(attn.heads):
            qh, kh, vh = (t[..., i * d : (i + 1) * d] for t in (q, k, v))
            s = torch.einsum("bmd,bme->bde", kh, vh) / kh.shape[1]  # mean_j k_j^T v_j
            z = kh.mean(dim=1)  # mean_j k_j
            heads.append((qh @ s) / (torch.einsum("bnd,bd->bn", qh, z)[..., None] + self.eps))
        return attn.to_out[1](attn.to_out[0](torch.cat(heads, dim=-1)))


# Max error allowed, in float32 ulps at the output's largest magnitude. The reference runs in float64, so the
# difference is the student's own float32 rounding through two blocks: 2.2-2.3 ulps measured (AMD EPYC). 8 leaves
# room for other CPUs' kernels. A zeroed attention output is ~1e5 ulps off, a dropped eps (at eps=1e-2) ~5e4.
CONVERT_ULPS = 8


@pytest.mark.parametrize("eps", [None, 1e-2], ids=["saved-conversion", "eps-1e-2"])
def test_converted_model_equals_teacher_with_reference_edit_attention(tiny_dirs, eps):
    teacher = PixArtTransformer2DModel.from_pretrained(tiny_dirs["tiny-pixart"], subfolder="transformer").eval()
    if eps is None:  # the folder `edit-mobile convert` wrote (default EDiTConfig), loaded back
        student = EDiTPixArtTransformer2DModel.from_pretrained(tiny_dirs["tiny-pixart-edit"], subfolder="transformer")
    else:
        # At the default eps (1e-6) the eps term is below float32 resolution here (denominators q.z >= 0.02), so
        # dropping it moves the output by only ~8 ulps; a larger configured eps makes its use observable.
        student = EDiTPixArtTransformer2DModel.from_teacher(teacher, EDiTConfig(eps=eps))
    student.eval()

    # Every teacher tensor is in the student, unchanged.
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for key, value in t_state.items():
        assert key in s_state and torch.equal(s_state[key], value), key

    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([1, 900])
    grid = (latents.shape[-2] // teacher.config.patch_size, latents.shape[-1] // teacher.config.patch_size)
    reference = copy.deepcopy(teacher).to(torch.float64)
    for block in reference.transformer_blocks:
        block.attn1.set_processor(_ReferenceEDiTSelfAttention(grid, student.edit.eps))
    with torch.no_grad():
        ref = reference(latents.double(), encoder_hidden_states=ctx.double(), timestep=timestep).sample
        out = student(latents, encoder_hidden_states=ctx, timestep=timestep).sample
    assert out.dtype == torch.float32 and out.shape == ref.shape
    ulp = float(np.spacing(np.float32(ref.abs().max())))
    err = float((out.double() - ref).abs().max())
    assert err <= CONVERT_ULPS * ulp, f"max abs diff {err:.3g} = {err / ulp:.1f} float32 ulps"


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["convert", "no-such-preset", "--arch", "edit"], "neither a preset"),
        (["convert", "{missing}", "--arch", "edit"], "neither a preset"),
        (["convert", "{empty}", "--arch", "edit"], "model_index.json is missing"),
        (["convert", "{notpipe}", "--arch", "edit"], "expected one of PixArtSigmaPipeline"),
        (["convert", "tiny-sd3", "--arch", "edit"], "converts a PixArtTransformer2DModel"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, expected):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notpipe").mkdir()
    (tmp_path / "notpipe" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "notpipe": tmp_path / "notpipe"}
    argv = [a.format(**paths) for a in argv] + ["--out", str(tmp_path / "out")]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]


def test_cli_refuses_existing_output(tiny_dirs, capsys):
    assert cli(["convert", "tiny-pixart", "--arch", "edit", "--out", str(tiny_dirs["tiny-pixart-edit"])]) == 2
    assert "already exists" in capsys.readouterr().err
