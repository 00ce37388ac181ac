"""edit-mobile validate: its gates catch bugs in the runtime's loop (not only in exported graphs), for fp32 and
quantized packages alike; the batch-1 and no-guidance paths; inspect and convert through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edit_mobile.cli.main import main as cli
from edit_mobile.export.validate import IMAGE_GATE_DB, TRAJECTORY_GATE_DB
from edit_mobile.runtime.pipeline import Text2ImagePipeline

VALIDATE = ["--steps", "4"]


@pytest.fixture(scope="module")
def packages(tiny_dirs, tmp_path_factory):
    """fp32 ONNX packages at 128x128: PixArt EDiT at batch 2 (one CFG call per step), SD3 MM-EDiT at batch 1
    (two calls per step with guidance), and an int8-dynamic copy of the PixArt one."""
    root = tmp_path_factory.mktemp("validate")
    out = {"pixart": root / "pixart", "sd3-batch1": root / "sd3-batch1", "pixart-int8": root / "pixart-int8"}
    assert (
        cli(["export", str(tiny_dirs["tiny-pixart-edit-trained"]), "--resolution", "128", "--out", str(out["pixart"])])
        == 0
    )
    assert (
        cli(
            [
                "export",
                str(tiny_dirs["tiny-sd3-mm-edit-trained"]),
                "--resolution",
                "128",
                "--batch",
                "1",
                "--out",
                str(out["sd3-batch1"]),
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "quantize",
                str(out["pixart"]),
                "--precision",
                "int8-dynamic",
                "--components",
                "transformer",
                "--out",
                str(out["pixart-int8"]),
            ]
        )
        == 0
    )
    return out


def _validate(pkg, tmp_path, *extra) -> tuple[int, dict]:
    report_path = tmp_path / "report.json"
    code = cli(["validate", str(pkg), *VALIDATE, *extra, "--json", str(report_path)])
    return code, json.loads(report_path.read_text())


@pytest.fixture
def swapped_cfg_rows(monkeypatch):
    """Plant a classifier-free-guidance bug in the runtime loop: the transformer's (uncond, cond) output rows come
    back swapped, so guidance pushes away from the prompt. The exported graphs stay correct."""
    original = Text2ImagePipeline._denoise

    def buggy(self, latent_input, t, cond, record):
        noise = original(self, latent_input, t, cond, record)
        return noise[::-1].copy() if noise.shape[0] == 2 else noise

    monkeypatch.setattr(Text2ImagePipeline, "_denoise", buggy)


def test_correct_fp32_package_passes_every_gate(packages, tmp_path):
    code, report = _validate(packages["pixart"], tmp_path)
    assert code == 0 and report["passed"]
    gate = report["trajectory_gate"]
    assert gate["gate_db"] == TRAJECTORY_GATE_DB and gate["passed"]
    assert gate["min_psnr_db"] == min(t["psnr_db"] for t in report["trajectory"])
    # An exact export sits far above the gates (float noise only); a bug far below (docs/validation.md).
    assert gate["min_psnr_db"] >= TRAJECTORY_GATE_DB + 40
    loop = report["loop"]
    assert loop["passed"] and loop["trajectory_min_psnr_db"] >= TRAJECTORY_GATE_DB + 40
    assert loop["image_psnr_db"] >= IMAGE_GATE_DB + 20


def test_loop_bug_fails_an_fp32_package(packages, tmp_path, swapped_cfg_rows):
    code, report = _validate(packages["pixart"], tmp_path)
    assert code == 1 and not report["passed"]
    # The graphs are right (every component passes on replayed inputs); the trajectory and the loop check fail.
    assert all(c["passed"] for c in report["components"].values())
    assert not report["trajectory_gate"]["passed"] and not report["loop"]["passed"]
    assert report["trajectory_gate"]["min_psnr_db"] < TRAJECTORY_GATE_DB


def test_loop_bug_fails_a_quantized_package(packages, tmp_path, swapped_cfg_rows):
    """A quantized package's end-to-end trajectory is not gated (quantization moves it), so without the loop check
    this bug would pass: its components are checked on inputs replayed from diffusers, where guidance never enters."""
    code, report = _validate(packages["pixart-int8"], tmp_path)
    assert report["components"]["transformer"]["precision"] == "int8-dynamic"
    assert all(c["passed"] for c in report["components"].values())
    assert report["trajectory_gate"]["gate_db"] is None
    assert code == 1 and not report["passed"] and not report["loop"]["passed"]


def test_quantized_package_passes_with_a_correct_loop(packages, tmp_path):
    code, report = _validate(packages["pixart-int8"], tmp_path)
    assert code == 0 and report["passed"] and report["loop"]["passed"]
    # reported: how far quantization moves the image from the fp32 loop's (not gated)
    assert 0 < report["loop"]["package_image_vs_fp32_loop_psnr_db"] < 200


def test_guidance_1_validates_a_batch_2_package(packages, tmp_path):
    """guidance <= 1 turns CFG off: diffusers calls the transformer with one row, the batch-2 graph gets it
    repeated (used to end in a traceback)."""
    code, report = _validate(packages["pixart"], tmp_path, "--guidance", "1")
    assert code == 0 and report["passed"] and report["guidance"] == 1.0


@pytest.mark.parametrize("guidance", ["7", "1"])
def test_batch_1_package_generates_and_validates(packages, tmp_path, guidance):
    pkg = packages["sd3-batch1"]
    assert json.loads((pkg / "manifest.json").read_text())["batch"] == 1
    calls = []
    pipe = Text2ImagePipeline(pkg, progress=False)
    original = pipe.models["transformer"].run
    pipe.models["transformer"].run = lambda inputs: calls.append(inputs["sample"].shape) or original(inputs)
    result = pipe("a blue square", steps=3, guidance=float(guidance), seed=1)
    # CFG on a batch-1 graph: two calls per step (uncond, cond); without CFG one.
    assert calls == [(1, 16, 16, 16)] * (3 * (2 if guidance == "7" else 1))
    assert result.image.shape == (128, 128, 3) and result.image.std() > 0
    code, report = _validate(pkg, tmp_path, "--guidance", guidance)
    assert code == 0 and report["passed"], report


def test_guidance_changes_the_image(packages):
    """The guidance scale reaches the loop: two scales give two different images from the same noise."""
    pipe = Text2ImagePipeline(packages["sd3-batch1"], progress=False)
    a, b = (pipe("a blue square", steps=2, guidance=g, seed=3).image for g in (1.0, 7.0))
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0


def test_inspect_through_the_cli(packages, tmp_path, capsys):
    out = tmp_path / "inspect.json"
    assert cli(["inspect", str(packages["pixart"]), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report) == {"text_encoder", "transformer", "vae_decoder", "vae_encoder"}
    for name, r in report.items():
        assert name in printed and r["parameters"] > 0 and r["dynamic_io_dims"] == []
    assert report["transformer"]["ops"].get("Conv", 0) > 0  # EDiT's ConvFusion and compressors


def test_convert_through_the_cli(tmp_path):
    from diffusers import PixArtSigmaPipeline

    from edit_mobile.models import EDiTPixArtTransformer2DModel

    out = tmp_path / "converted"
    assert cli(["convert", "tiny-pixart", "--arch", "edit", "--out", str(out)]) == 0
    pipe = PixArtSigmaPipeline.from_pretrained(out)
    assert type(pipe.transformer) is EDiTPixArtTransformer2DModel
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]  # no temporary folder left behind
