"""Distillation: the loss goes down, the output exports, exact resume, two processes agree, data sources, bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import edit_mobile.models  # noqa: F401  (registers the EDiT classes for diffusers' from_pretrained)
from edit_mobile.cli.main import main as cli
from edit_mobile.models import EDiTPixArtTransformer2DModel
from edit_mobile.models.convert import trained_text_tokens
from edit_mobile.models.data import FolderSource, SyntheticSource
from edit_mobile.models.distill import distill
from edit_mobile.models.distill_checkpoint import state_digest
from edit_mobile.models.distill_config import DistillConfig, parse_loss_weights, stage_plan
from edit_mobile.runtime.errors import UserError

FAST = ["--resolution", "64", "--batch-size", "2", "--data", "synthetic:8"]  # 64 px: 4x4 tokens on the tiny presets


def _state(out):
    return json.loads((out / "trainer_state.json").read_text())


def _weights(folder):
    return EDiTPixArtTransformer2DModel.from_pretrained(folder / "transformer").state_dict()


def _interrupted_at_step_2(full, part):
    """An interrupted run: its folder holds the config, the step-2 checkpoint and losses logged past it."""
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    for name in ("distill_config.json", "losses.csv"):
        shutil.copy(full / name, part / name)
    return part


def test_cli_distill_lowers_loss_and_writes_an_exportable_pipeline(tiny_dirs, tmp_path):
    from edit_mobile.export.package import export_package
    from edit_mobile.models.convert import load_pipeline

    out = tmp_path / "distilled"
    argv = [
        "distill",
        "--teacher",
        "tiny-pixart",
        "--student",
        str(tiny_dirs["tiny-pixart-edit"]),
        "--out",
        str(out),
        "--steps",
        "20",
        "--checkpoint-every",
        "10",
        *FAST,
    ]
    assert cli(argv) == 0
    state = _state(out)
    assert state["eval"]["20"]["loss"] < state["eval"]["0"]["loss"]
    rows = list(csv.DictReader((out / "losses.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 21))
    assert (out / "losses.png").stat().st_size > 0
    for step in (10, 20):
        ckpt = out / "checkpoints" / f"step-{step}"
        for name in (
            "transformer/diffusion_pytorch_model.safetensors",
            "optimizer.bin",
            "distill_config.json",
            "trainer_state.json",
        ):
            assert (ckpt / name).is_file(), name
    assert DistillConfig.load(out / "distill_config.json").steps == 20

    pipe = load_pipeline(out)
    assert type(pipe.transformer) is EDiTPixArtTransformer2DModel
    before, after = _weights(tiny_dirs["tiny-pixart-edit"]), pipe.transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert state["rank_weight_digests"] == [state_digest(pipe.transformer)]
    manifest = export_package(str(out), tmp_path / "pkg", resolution=64, batch=1)
    assert "transformer" in manifest["components"]


def test_distillation_losses_go_down(tiny_dirs, tmp_path):
    # The tiny teacher has random weights, so its task loss pulls the student away from it: train on the
    # distillation terms alone and check that both come down on the fixed evaluation batch.
    config = DistillConfig(
        teacher=str(tiny_dirs["tiny-pixart"]),
        student=str(tiny_dirs["tiny-pixart-edit"]),
        out=str(tmp_path / "d"),
        steps=6,
        resolutions=[64],
        batch_size=2,
        data="synthetic:8",
        loss_weights={"task": 0.0, "output": 1.0, "feature": 1.0},
        checkpoint_every=6,
    )
    summary = distill(config)
    start, end = summary["eval_start"], summary["eval_end"]
    assert end["output"] < start["output"] and end["feature"] < 0.8 * start["feature"], (start, end)


def test_resume_reproduces_the_uninterrupted_run(tiny_dirs, tmp_path):
    def config(out):
        return DistillConfig(
            teacher=str(tiny_dirs["tiny-pixart"]),
            student=str(tiny_dirs["tiny-pixart-edit"]),
            out=str(out),
            steps=4,
            resolutions=[64],
            batch_size=2,
            data="synthetic:8",
            grad_accum=2,
            checkpoint_every=2,
            keep_checkpoints=3,
        )

    full = tmp_path / "full"
    distill(config(full))
    part = _interrupted_at_step_2(full, tmp_path / "part")
    distill(config(part), resume=True)

    a, b = _weights(full), _weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [[r["loss"] for r in csv.DictReader((out / "losses.csv").open())] for out in (full, part)]
    assert logged[0] == logged[1] and len(logged[0]) == 4


def test_training_from_scratch_resumes_exactly_and_writes_the_ema_weights(tiny_dirs, tmp_path):
    """No teacher: the student folder's own transformer (here an unconverted PixArt) trains on the task loss alone,
    with warm-up + cosine learning rate and EMA weights; a resumed run reproduces the uninterrupted one bit for bit
    (EMA state included) and the written pipeline holds the EMA weights, not the last raw ones."""
    from diffusers import PixArtTransformer2DModel

    def config(out):
        return DistillConfig(
            teacher=None,
            student=str(tiny_dirs["tiny-pixart"]),
            out=str(out),
            steps=4,
            resolutions=[64],
            batch_size=2,
            data="synthetic-single:8",
            checkpoint_every=2,
            keep_checkpoints=3,
            lr=1e-3,
            warmup_steps=1,
            lr_schedule="cosine",
            ema_decay=0.9,
            loss_weights={"task": 1.0, "output": 0.0, "feature": 0.0},
            max_text_tokens=16,
        )

    def weights(folder):
        return PixArtTransformer2DModel.from_pretrained(folder / "transformer").state_dict()

    full = tmp_path / "full"
    distill(config(full))
    part = _interrupted_at_step_2(full, tmp_path / "part")
    distill(config(part), resume=True)

    written, resumed = weights(full), weights(part)
    assert all(torch.equal(written[k], resumed[k]) for k in written)
    raw, start = weights(full / "checkpoints" / "step-4"), weights(tiny_dirs["tiny-pixart"])
    changed = [k for k in raw if not torch.equal(raw[k], start[k])]
    assert changed and all(not torch.equal(written[k], raw[k]) for k in changed)  # EMA lags the raw weights
    rows = list(csv.DictReader((full / "losses.csv").open()))
    assert [float(r["lr"]) for r in rows] == [config(full).lr_at(s) for s in range(4)]
    assert config(full).lr_at(0) == 1e-3 and config(full).lr_at(3) < 1e-3 / 2  # warm-up 1 step, then cosine
    assert all(float(r["output"]) == 0 == float(r["feature"]) for r in rows)
    trained = json.loads((full / "edit_mobile.json").read_text())["trained"]
    assert trained["teacher"] is None and trained["max_text_tokens"] == 16  # what export and evaluate run it at
    assert trained_text_tokens(full) == 16


@pytest.mark.slow
def test_two_processes_end_with_identical_weights(tiny_dirs, tmp_path):
    """torchrun, 2 CPU processes over gloo, with gradient accumulation: both ranks' final weights agree (digests
    gathered from every rank) and match one process with the same global batch (same samples and noise) up to
    float rounding."""
    common = [
        "--teacher",
        str(tiny_dirs["tiny-pixart"]),
        "--student",
        str(tiny_dirs["tiny-pixart-edit"]),
        "--steps",
        "3",
        "--grad-accum",
        "2",
        "--resolution",
        "64",
        "--caption-dropout",
        "0.5",
        "--data",
        "synthetic:8",
    ]
    # gloo binds to the address the hostname resolves to; on a machine whose hostname points at an interface the
    # sandbox cannot reach, the ranks would wait on each other until the timeout. Loopback always connects.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",  # rendezvous on a port the OS picks (no race for a port chosen beforehand)
        "-m",
        "edit_mobile.cli",
        "distill",
        *common,
        "--out",
        str(tmp_path / "two"),
        "--batch-size",
        "1",
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:  # say where it stopped, not only that it did
        tail = (e.stderr or b"").decode(errors="replace")[-3000:] if isinstance(e.stderr, bytes) else e.stderr
        pytest.fail(f"torchrun did not finish in {e.timeout} s; its stderr ends with:\n{tail}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    digests = _state(tmp_path / "two")["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    two = _weights(tmp_path / "two")
    assert digests[0] == state_digest(EDiTPixArtTransformer2DModel.from_pretrained(tmp_path / "two" / "transformer"))

    assert cli(["distill", *common, "--out", str(tmp_path / "one"), "--batch-size", "2"]) == 0
    one, start = _weights(tmp_path / "one"), _weights(tiny_dirs["tiny-pixart-edit"])
    moved = sum((one[k] - start[k]).norm() ** 2 for k in one) ** 0.5
    apart = sum((one[k] - two[k]).norm() ** 2 for k in one) ** 0.5
    assert apart < 1e-3 * moved, (apart, moved)


def test_mm_edit_sd3_distills_from_an_image_folder(tiny_dirs, tmp_path, monkeypatch):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from edit_mobile.models import MMEDiTSD3Transformer2DModel
    from edit_mobile.models import distill as distill_module

    data = tmp_path / "data"  # an image + caption folder (images of any size are cropped to the resolution)
    data.mkdir()
    for i, (size, color) in enumerate([((96, 64), "red"), ((64, 80), "blue"), ((70, 70), "green")]):
        Image.new("RGB", size, color).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {color} wall")
    # Keep a handle on the pipeline the trainer loads (teacher transformer, VAE, text encoders): they are meant to
    # stay frozen, and they live only inside distill().
    loaded = []
    real_load = distill_module.load_pipeline
    monkeypatch.setattr(distill_module, "load_pipeline", lambda src: loaded.append(real_load(src)) or loaded[-1])
    out = tmp_path / "sd3"
    summary = distill(
        DistillConfig(
            teacher=str(tiny_dirs["tiny-sd3"]),
            student=str(tiny_dirs["tiny-sd3-mm-edit"]),
            out=str(out),
            steps=2,
            resolutions=[64],
            batch_size=2,
            data=str(data),
            feature_prompt=True,
        )
    )
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    assert type(pipe.transformer) is MMEDiTSD3Transformer2DModel
    # What was written is what was trained (the digest every rank reported at the end).
    assert summary["rank_weight_digests"] == [state_digest(pipe.transformer)]

    # Losses: every reported total is the weighted sum of its parts (all weights 1 here; eval values are rounded to
    # 8 decimals), the parts are positive (the converted student is not the teacher: its image rows mix in linear
    # attention, so output and feature losses are > 0 from the start), and the fixed-batch eval changed: the
    # weights it was computed with moved.
    start, end = summary["eval_start"], summary["eval_end"]
    rows = list(csv.DictReader((out / "losses.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2]
    for parts in [start, end, *({k: float(r[k]) for k in ("loss", "task", "output", "feature")} for r in rows)]:
        assert all(math.isfinite(parts[k]) and parts[k] > 0 for k in ("task", "output", "feature")), parts
        assert math.isclose(
            parts["loss"], parts["task"] + parts["output"] + parts["feature"], rel_tol=1e-6, abs_tol=3e-8
        ), parts
    assert start != end
    assert _state(out)["eval"] == {"0": start, "2": end}

    # Parameters: the whole student is trained except the weights its forward never reaches, which
    # `freeze_unused` freezes at the teacher's values: the last (context_pre_only) block's prompt queries and its
    # image-key norm (token-count eta needs no image keys in the softmax), and the QK-norm of SD3.5's converted
    # image-only attn2 (EDiT's linear attention has no QK-norm).
    before = MMEDiTSD3Transformer2DModel.from_pretrained(tiny_dirs["tiny-sd3-mm-edit"], subfolder="transformer")
    blocks = before.transformer_blocks
    last = len(blocks) - 1
    assert blocks[last].attn.context_pre_only and before.edit.eta_mode == "token_count"
    dead = {
        f"transformer_blocks.{last}.attn.{n}"
        for n in ("add_q_proj.weight", "add_q_proj.bias", "norm_added_q.weight", "norm_k.weight")
    }
    dead |= {
        f"transformer_blocks.{i}.attn2.{n}"
        for i, b in enumerate(blocks)
        if b.attn2 is not None
        for n in ("norm_q.weight", "norm_k.weight")
    }
    teacher_start = SD3Transformer2DModel.from_pretrained(tiny_dirs["tiny-sd3"], subfolder="transformer").state_dict()
    after = dict(pipe.transformer.named_parameters())
    moved = []
    for name, p0 in before.named_parameters():
        if name in dead:
            assert torch.equal(after[name], teacher_start[name]), name
        elif name.endswith("conv_fusion.conv_in.bias"):
            # ConvFusion's GroupNorm has one channel per group on this tiny width, so this per-channel bias is
            # normalised away: its gradient is zero up to rounding, and whether Adam moves it depends on that noise.
            continue
        else:
            moved.append(name)
            assert not torch.equal(after[name], p0), f"{name} was not trained"
    # That includes every new EDiT layer of every converted attention (ConvFusion's zero-initialised output conv
    # must leave zero for the queries to get any local context) as well as the teacher-inherited weights.
    converted = [
        f"transformer_blocks.{i}.{a}"
        for i, b in enumerate(blocks)
        for a in ("attn", "attn2")
        if hasattr(getattr(b, a, None), "conv_fusion")
    ]
    assert len(converted) > len(blocks)  # every joint attention, plus the dual-attention block's attn2
    for path in converted:
        for layer in (
            "conv_fusion.conv_out.weight",
            "k_compressor.conv.weight",
            "v_compressor.conv.weight",
            "to_q.weight",
            "to_out.0.weight",
        ):
            assert f"{path}.{layer}" in moved, f"{path}.{layer}"

    # The frozen modules did not move: the teacher transformer, VAE and text encoders the trainer held end exactly
    # as loaded from the teacher folder.
    (teacher_pipe,) = loaded
    fresh = StableDiffusion3Pipeline.from_pretrained(tiny_dirs["tiny-sd3"])
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        held, ref = getattr(teacher_pipe, component).state_dict(), getattr(fresh, component).state_dict()
        assert held.keys() == ref.keys() and all(torch.equal(held[k], ref[k]) for k in ref), component


def test_synthetic_source_is_deterministic_per_index():
    a, b = SyntheticSource(size=16, seed=3), SyntheticSource(size=16, seed=3)
    assert a.caption(5) == b.caption(5) and a.image(5, 64).tobytes() == b.image(5, 64).tobytes()
    assert a.image(5, 32).size == (32, 32) and "background" in a.caption(5)
    assert len({a.caption(i) for i in range(16)}) > 8


def test_folder_source_reads_captions_and_crops(tmp_path):
    Image.new("RGB", (120, 80), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red square\n")
    source = FolderSource(tmp_path)
    assert len(source) == 1 and source.caption(0) == "a red square"
    assert source.image(0, 64).size == (64, 64)


def test_parsing_helpers():
    assert parse_loss_weights("task=0,feature=2.5") == {"task": 0.0, "output": 1.0, "feature": 2.5}
    config = DistillConfig(teacher="t", student="s", out="o", steps=10, resolutions=[64, 128])
    assert stage_plan(config, 256) == [(0, 64), (5, 128)]
    assert stage_plan(DistillConfig(teacher="t", student="s", out="o", steps=3), 256) == [(0, 256)]
    with pytest.raises(UserError):
        DistillConfig(teacher="t", student="s", out="o", steps=10, resolutions=[64, 128], stage_steps=[3]).validate()


@pytest.mark.parametrize(
    "case,expected",
    [
        ("sd3_teacher", "architectures differ"),
        ("teacher_as_student", "not an EDiT / MM-EDiT model"),
        ("narrower_student", "does not match the teacher's transformer: num_layers"),
        ("converted_teacher", "already converted); a teacher must be the unconverted PixArtTransformer2DModel"),
        ("missing_data", "does not exist"),
        ("uncaptioned_data", "2 image(s) without a same-stem .txt caption: b.png, c.jpg"),
        ("unwritable_out", "cannot write"),
        ("existing_out", "already exists"),
        ("bad_weights", "bad --loss-weights item 'task=abc'"),
        ("bad_resolution", "unknown resolution 100: must be a multiple of 16"),
        ("word_resolution", "unknown resolution 'big'"),
        ("no_teacher_output_loss", "the output and feature losses compare with a teacher"),
        ("no_teacher_preset_student", "without --teacher, --student must be a diffusers pipeline folder"),
        ("bad_ema", "ema decay must be in [0, 1), got 1.0"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tiny_dirs, tmp_path, capsys, case, expected):
    teacher, student = "tiny-pixart", str(tiny_dirs["tiny-pixart-edit"])
    out, extra = tmp_path / "out", []
    if case == "sd3_teacher":
        teacher = "tiny-sd3"
    elif case == "teacher_as_student":
        student = str(tiny_dirs["tiny-pixart"])
    elif case == "narrower_student":
        shutil.copytree(student, tmp_path / "narrow")
        cfg = tmp_path / "narrow" / "transformer" / "config.json"
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "num_layers": 1}))
        student = str(tmp_path / "narrow")
    elif case == "converted_teacher":
        teacher = student
    elif case == "missing_data":
        extra = ["--data", str(tmp_path / "nowhere")]
    elif case == "uncaptioned_data":
        data = tmp_path / "data"
        data.mkdir()
        for name in ("a.png", "b.png", "c.jpg"):
            Image.new("RGB", (8, 8)).save(data / name)
        (data / "a.txt").write_text("a black square")
        extra = ["--data", str(data)]
    elif case == "unwritable_out":
        (tmp_path / "file").write_text("not a folder")
        out = tmp_path / "file" / "out"
    elif case == "existing_out":
        out.mkdir()
    elif case == "bad_weights":
        extra = ["--loss-weights", "task=abc"]
    elif case == "bad_resolution":
        extra = ["--resolution", "100"]
    elif case == "word_resolution":
        extra = ["--resolution", "big"]
    elif case == "no_teacher_output_loss":
        teacher, student, extra = None, str(tiny_dirs["tiny-pixart"]), ["--loss-weights", "output=1"]
    elif case == "no_teacher_preset_student":
        teacher, student = None, "tiny-pixart"
    elif case == "bad_ema":
        extra = ["--ema-decay", "1"]
    argv = [
        "distill",
        *(["--teacher", teacher] if teacher else []),
        "--student",
        student,
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "1",
        *extra,
    ]
    if "--resolution" not in extra:
        argv += ["--resolution", "64"]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert case == "existing_out" or not out.exists()


def test_resume_refuses_changed_settings(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    DistillConfig(
        teacher="tiny-pixart",
        student=str(tiny_dirs["tiny-pixart-edit"]),
        out=str(out),
        steps=2,
        resolutions=[64],
        batch_size=1,
        lr=1e-4,
    ).save(out / "distill_config.json")
    argv = [
        "distill",
        "--teacher",
        "tiny-pixart",
        "--student",
        str(tiny_dirs["tiny-pixart-edit"]),
        "--out",
        str(out),
        "--steps",
        "4",
        "--resolution",
        "64",
        "--batch-size",
        "1",
        "--lr",
        "1e-3",
        "--resume",
    ]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "lr 0.0001 -> 0.001" in err


def test_min_snr_weights_follow_the_schedule():
    """--snr-gamma: each sample's ε loss weighted min(SNR, γ) / SNR, SNR = ᾱ / (1 - ᾱ) from the pipeline's betas."""
    from edit_mobile.models.families import DDPMNoise
    from edit_mobile.models.presets import pixart_scheduler

    noise = DDPMNoise(pixart_scheduler().config)
    t = torch.tensor([0, 100, 400, 700, 999])
    abar = noise.ddpm.alphas_cumprod[t].double()
    snr = abar / (1 - abar)
    expected = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    got = noise.snr_weights(t, 5.0).double()
    assert torch.allclose(got, expected, rtol=4 * torch.finfo(torch.float32).eps)
    assert got[0] < 0.01 and got[-1] == 1  # low noise down-weighted, high noise kept


def test_snr_gamma_reweights_the_task_loss(tiny_dirs, tmp_path, capsys):
    def first_task_loss(out, **extra):
        distill(
            DistillConfig(
                teacher=None,
                student=str(tiny_dirs["tiny-pixart"]),
                out=str(out),
                steps=1,
                resolutions=[64],
                batch_size=2,
                data="synthetic-single:8",
                loss_weights={"task": 1.0, "output": 0.0, "feature": 0.0},
                **extra,
            )
        )
        return float(next(csv.DictReader((out / "losses.csv").open()))["task"])

    uniform, weighted = first_task_loss(tmp_path / "u"), first_task_loss(tmp_path / "w", snr_gamma=5.0)
    assert weighted < uniform  # every weight is <= 1, and the low-noise samples' are far below
    assert DistillConfig.load(tmp_path / "w" / "distill_config.json").snr_gamma == 5.0
    argv = ["distill", "--student", str(tiny_dirs["tiny-sd3"]), "--out", str(tmp_path / "sd3"), *FAST]
    assert cli([*argv, "--steps", "1", "--snr-gamma", "5"]) == 2
    err = capsys.readouterr().err.strip()  # after the pipeline's loading bars: the family is known once it is loaded
    assert "--snr-gamma weights an ε-prediction loss" in err.splitlines()[-1] and "Traceback" not in err
