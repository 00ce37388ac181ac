"""edit-mobile evaluate: the shipped shapes classifier reads held-out renders right, the Fréchet distance separates
renders from noise, evaluation runs end to end through diffusers and through a package (same latents, same
images), the package path needs no torch, and bad input is one error line."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter

from edit_mobile.cli.main import main as cli
from edit_mobile.runtime.errors import UserError
from edit_mobile.runtime.evaluate import (
    ShapesClassifier,
    accuracy,
    default_classifier_path,
    evaluate,
    evaluate_with_images,
    frechet_distance,
)
from edit_mobile.runtime.metrics import psnr
from edit_mobile.runtime.scenes import ATTRIBUTES, evaluation_scenes

PROMPTS, STEPS = 3, 2


@pytest.fixture(scope="module")
def classifier():
    return ShapesClassifier()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """tiny-pixart exported at 64x64 (8x8 latents): the smallest package the evaluation loop can run."""
    out = tmp_path_factory.mktemp("evaluate") / "pkg"
    assert cli(["export", "tiny-pixart", "--target", "onnx", "--resolution", "64", "--out", str(out)]) == 0
    return out


def test_shipped_classifier_files_and_metadata(classifier):
    path = default_classifier_path()
    assert path.is_file() and path.with_suffix(".json").is_file()
    assert path.stat().st_size < 1_000_000  # a small net: < 1 MB of weights
    meta = classifier.meta
    assert meta["attributes"] == {k: list(v) for k, v in ATTRIBUTES.items()} and meta["resolution"] == 64
    assert min(meta["training"]["heldout_accuracy_worst"].values()) >= 0.99


@pytest.mark.parametrize("side", [64, 128, 256])
def test_classifier_reads_fresh_heldout_renders(classifier, side):
    """>= 99 % per attribute on held-out combinations at placements it never saw (seed unused in training)."""
    scenes = evaluation_scenes(300, seed=2026)
    out = classifier([s.render(side) for s in scenes])
    acc = accuracy(out["predicted"], [s.attributes() for s in scenes])
    assert all(acc[k] >= 0.99 for k in ATTRIBUTES), acc


def test_classifier_reads_slightly_degraded_renders(classifier):
    """Generated images are imperfect: a blurred, noisy, darker render at 96 px still reads right."""
    rng = np.random.default_rng(0)
    images = []
    scenes = evaluation_scenes(200, seed=7)
    for s in scenes:
        x = np.asarray(s.render(96).filter(ImageFilter.GaussianBlur(0.7)), np.float32) * 0.95
        x += rng.standard_normal(x.shape).astype(np.float32) * 6.0
        images.append(Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8)))
    acc = accuracy(classifier(images)["predicted"], [s.attributes() for s in scenes])
    assert all(acc[k] >= 0.98 for k in ATTRIBUTES), acc


def test_frechet_distance(classifier):
    scenes = evaluation_scenes(64, seed=3)
    renders = classifier([s.render(128) for s in scenes])["features"]
    same_scenes = classifier([s.render(256) for s in scenes])["features"]
    rng = np.random.default_rng(0)
    noise = classifier([Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)) for _ in scenes])
    assert frechet_distance(renders, renders) == pytest.approx(0.0, abs=1e-6)
    small, large = frechet_distance(renders, same_scenes), frechet_distance(renders, noise["features"])
    assert small < 5.0 and large > 100 * small, (small, large)
    # few samples (singular covariances), one sample: finite and >= 0
    for n in (1, 2, 5):
        d = frechet_distance(renders[:n], noise["features"][:n])
        assert np.isfinite(d) and d > 0
    # matches the textbook formula (scipy's sqrtm) on full-rank covariances
    from scipy import linalg

    a = rng.standard_normal((300, 6))
    b = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6)) + 0.5
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)


def _check_report(report: dict, count: int) -> None:
    assert set(report["accuracy"]) == {"all", *ATTRIBUTES}
    assert all(0.0 <= v <= 1.0 for v in report["accuracy"].values())
    assert report["reference_accuracy"]["all"] == 1.0  # the classifier reads the real renders of these scenes
    assert np.isfinite(report["frechet_distance"]) and report["frechet_distance"] >= 0
    assert len(report["prompts"]) == report["count"] == count
    for row in report["prompts"]:
        assert set(row) >= {"prompt", "seed", "predicted", "correct"} and set(row["predicted"]) == set(ATTRIBUTES)
    assert report["accuracy"]["all"] == np.mean([r["correct"] for r in report["prompts"]])
    json.dumps(report)  # JSON-ready


def test_evaluate_diffusers_and_package_agree(package):
    """Same prompts, seeds and initial latents through diffusers and through the exported package."""
    kw = dict(prompts=PROMPTS, seed=5, steps=STEPS)
    ref, ref_images = evaluate_with_images("tiny-pixart", resolution=64, **kw)
    got, images = evaluate_with_images(package, **kw)
    for report, kind in ((ref, "diffusers"), (got, "package")):
        _check_report(report, PROMPTS)
        assert report["kind"] == kind and report["resolution"] == [64, 64] and report["family"] == "pixart"
    assert [r["prompt"] for r in ref["prompts"]] == [s.caption for s in evaluation_scenes(PROMPTS, 5)]
    assert [r["seed"] for r in ref["prompts"]] == [r["seed"] for r in got["prompts"]] == [5, 6, 7]
    for a, b in zip(ref_images, images):
        assert a.size == b.size == (64, 64)
        assert psnr(np.asarray(a, np.float64), np.asarray(b, np.float64), peak=255.0) >= 40
    assert got["frechet_distance"] == pytest.approx(ref["frechet_distance"], rel=0.05, abs=1.0)


def test_evaluate_cli_with_prompt_file_json_and_grid(package, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# two captions\na large red circle on a white background\n\nA small blue ring on a black background\n"
    )
    out, grid = tmp_path / "eval.json", tmp_path / "grid.png"
    argv = ["evaluate", str(package), "--prompt-file", str(prompts), "--steps", "1", "--json", str(out)]
    assert cli([*argv, "--grid", str(grid)]) == 0
    assert "accuracy" in capsys.readouterr().out
    report = json.loads(out.read_text())
    _check_report(report, 2)
    assert report["prompt_source"] == str(prompts) and report["prompts"][1]["seed"] == 1
    assert Image.open(grid).size[0] >= 2 * 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "grid.png", "prompts.txt"]  # no temp files


def test_package_evaluation_needs_no_torch(package):
    code = (
        "import sys; sys.modules.update(torch=None, diffusers=None, transformers=None); "
        "from edit_mobile.runtime.evaluate import evaluate; "
        f"r = evaluate({str(package)!r}, prompts=1, steps=1); assert 0 <= r['accuracy']['all'] <= 1; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if sys.modules.get(m) is not None]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "argv, prompt_file, message",
    [
        (["no-such-preset"], None, "neither a preset"),
        (["{tmp}/missing/folder"], None, "neither a preset"),
        (["{tmp}"], None, "neither a package"),
        (["tiny-pixart", "--prompts", "0"], None, "--prompts must be"),
        (["tiny-pixart", "--steps", "0"], None, "--steps must be"),
        (["tiny-pixart"], "\n# nothing\n\n", "has no prompts"),
        (["tiny-pixart"], "a red circle\n", "is not a single-shape scene caption"),
        (["tiny-pixart"], "a small red circle on a red-ish background\n", "prompt 1"),
        (["tiny-pixart", "--json", "{tmp}/nope/x.json"], None, "does not exist"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, argv, prompt_file, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if prompt_file is not None:
        (tmp_path / "p.txt").write_text(prompt_file)
        argv += ["--prompt-file", str(tmp_path / "p.txt")]
    capsys.readouterr()
    assert cli(["evaluate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("edit-mobile evaluate: error:") and message in err, err


def test_missing_prompt_file_and_classifier_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read prompt file"):
        evaluate("tiny-pixart", prompt_file=tmp_path / "none.txt")
    with pytest.raises(UserError, match="classifier not found"):
        evaluate("tiny-pixart", classifier=tmp_path / "none.onnx")
