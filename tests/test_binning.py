"""PixArt-Σ's resolution binning in the runtime (runtime/binning.py): a size between the package's buckets is
generated at the bucket diffusers would pick and resized back, as `PixArtSigmaPipeline(use_resolution_binning=True)`
does; `export --aspect-ratios` exports the model's own buckets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import PixArtSigmaPipeline
from diffusers.image_processor import PixArtImageProcessor

from edit_mobile.cli.main import main as cli
from edit_mobile.export.package import export_package
from edit_mobile.models.convert import load_pipeline
from edit_mobile.runtime.binning import classify, resize_and_crop, resize_bilinear
from edit_mobile.runtime.manifest import size_key
from edit_mobile.runtime.metrics import psnr
from edit_mobile.runtime.package import load_package
from edit_mobile.runtime.pipeline import Text2ImagePipeline, initial_noise


@pytest.mark.parametrize("size", [(64, 96), (23, 31), (80, 20), (40, 56)])
def test_bilinear_resize_is_torchs(size):
    x = np.random.default_rng(0).standard_normal((1, 3, 40, 56)).astype(np.float32)
    expected = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear", align_corners=False).numpy()
    # torch's float32 kernel rounds its weights its own way: equal within a few float32 steps of the values
    assert np.abs(resize_bilinear(x, *size) - expected).max() <= 64 * np.finfo(np.float32).eps * np.abs(x).max()


def test_resize_and_crop_and_classify_are_diffusers():
    x = np.random.default_rng(1).standard_normal((1, 3, 48, 80)).astype(np.float32)
    for height, width in ((50, 70), (48, 80), (30, 100)):
        expected = PixArtImageProcessor.resize_and_crop_tensor(torch.from_numpy(x), width, height).numpy()
        got = resize_and_crop(x, height, width)
        assert got.shape == expected.shape == (1, 3, height, width)
        assert np.abs(got - expected).max() <= 64 * np.finfo(np.float32).eps * np.abs(x).max()
    bins = {"0.5": [128, 256], "1.0": [192, 192], "2.0": [256, 128]}
    for height, width in ((100, 180), (300, 290), (500, 200), (150, 200)):
        assert classify(height, width, bins) == PixArtImageProcessor.classify_height_width_bin(height, width, bins)


@pytest.fixture(scope="module")
def bucket_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("bins") / "pkg"
    export_package("tiny-pixart", out, resolution=[], aspect_ratios="common", max_text_tokens=32)
    return out


def test_aspect_ratios_export_the_models_own_buckets(bucket_package):
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_256_BIN

    package = load_package(bucket_package)
    # tiny-pixart's sample size is 32: diffusers bins it with the 256 table; 1:1, 3:4, 9:16, 4:3, 16:9 (W:H)
    expected = [size_key(classify(h, w, ASPECT_RATIO_256_BIN)) for w, h in ((1, 1), (3, 4), (9, 16), (4, 3), (16, 9))]
    assert package.sizes == expected and len(set(expected)) == 5
    assert json.loads((bucket_package / "manifest.json").read_text())["resolution_bins"] == {
        k: [int(h), int(w)] for k, (h, w) in ASPECT_RATIO_256_BIN.items()
    }


def test_a_size_between_buckets_is_binned_as_diffusers_does(bucket_package):
    package = load_package(bucket_package)
    height, width = 290, 225  # nearest bucket by height / width: 288x224 (W 224, H 288)
    key, resize_to = package.generation_size((height, width))
    assert key == "224x288" and resize_to == (height, width)
    view = package.at_size(key)
    noise = initial_noise(view, 0)
    ours = Text2ImagePipeline(view, progress=False)(
        "a red circle", steps=2, guidance=4.5, latents=noise, output_size=resize_to
    )
    pipe = load_pipeline("tiny-pixart")
    assert isinstance(pipe, PixArtSigmaPipeline)
    with torch.inference_mode():
        reference = pipe(
            "a red circle",
            height=height,
            width=width,
            num_inference_steps=2,
            guidance_scale=4.5,
            latents=torch.from_numpy(noise.copy()),
            use_resolution_binning=True,
            max_sequence_length=32,
            output_type="np",
        ).images[0]
    assert ours.image.shape == reference.shape == (height, width, 3)
    assert psnr((reference * 255).round(), ours.image.astype(np.float64), peak=255.0) >= 40.0  # validate's image gate


def test_a_bucket_the_package_lacks_is_named(bucket_package, tmp_path, capsys):
    out = tmp_path / "x.png"
    argv = ["generate", str(bucket_package), "--size", "200x300", "--prompt", "x", "--out", str(out)]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "200x300 bins to 208x304" in err and "--resolution 208x304" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_sd3_has_no_buckets(tmp_path, capsys):
    assert cli(["export", "tiny-sd3", "--aspect-ratios", "common", "--out", str(tmp_path / "p")]) == 2
    assert "sd3 pipelines have no aspect-ratio buckets" in capsys.readouterr().err
    assert cli(["export", "tiny-pixart", "--aspect-ratios", "phones", "--out", str(tmp_path / "p")]) == 2
    assert "unknown --aspect-ratios 'phones'; expected one of common" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
