"""Conversion from diffusers teachers, save / load through the stock pipeline classes, CLI bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline, StableDiffusion3Pipeline

import edit_mobile.models  # noqa: F401  (registers the EDiT classes for diffusers' from_pretrained)
from edit_mobile.models import EDiTPixArtTransformer2DModel, MMEDiTSD3Transformer2DModel
from edit_mobile.models.presets import PRESETS
from edit_mobile.scripts.cli import main as cli

NEW_LAYERS = ("conv_fusion", "k_compressor", "v_compressor")
CASES = [("tiny-pixart", "edit", PixArtSigmaPipeline, EDiTPixArtTransformer2DModel),
         ("tiny-sd3", "mm-edit", StableDiffusion3Pipeline, MMEDiTSD3Transformer2DModel)]


@pytest.mark.parametrize("teacher_name,student_cls", [("tiny-pixart", EDiTPixArtTransformer2DModel),
                                                      ("tiny-sd3", MMEDiTSD3Transformer2DModel)])
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


def _generate(pipe, seed=0):
    kwargs = {"clean_caption": False} if isinstance(pipe, PixArtSigmaPipeline) else {}
    return pipe("a red circle", num_inference_steps=2, height=256, width=256, output_type="np",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


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


def test_converted_model_starts_close_to_teacher(tiny_dirs):
    teacher = PixArtSigmaPipeline.from_pretrained(tiny_dirs["tiny-pixart"]).transformer
    student = PixArtSigmaPipeline.from_pretrained(tiny_dirs["tiny-pixart-edit"]).transformer
    x, ctx = torch.randn(2, 4, 32, 32), torch.randn(2, 12, 32)
    with torch.no_grad():
        t = teacher(x, encoder_hidden_states=ctx, timestep=torch.tensor([1, 900])).sample
        s = student(x, encoder_hidden_states=ctx, timestep=torch.tensor([1, 900])).sample
    cos = torch.nn.functional.cosine_similarity(t.flatten(), s.flatten(), dim=0)
    assert cos > 0.9, cos


@pytest.mark.parametrize("argv,expected", [
    (["convert", "no-such-preset", "--arch", "edit"], "neither a preset"),
    (["convert", "{missing}", "--arch", "edit"], "neither a preset"),
    (["convert", "{empty}", "--arch", "edit"], "model_index.json is missing"),
    (["convert", "{notpipe}", "--arch", "edit"], "expected one of PixArtSigmaPipeline"),
    (["convert", "tiny-sd3", "--arch", "edit"], "converts a PixArtTransformer2DModel"),
])
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
