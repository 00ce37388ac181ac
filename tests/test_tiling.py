"""Tiled VAE (`export --vae-tile`, runtime/tiling.py): tiles cover the input with the requested overlap, the blend
is exact for any op without spatial context, a tiled package validates (its graphs exactly, the blend against the
untiled PyTorch module reported), quantizes on tiles, and bad tilings are refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edit_mobile.cli.main import main as cli
from edit_mobile.runtime.errors import UserError
from edit_mobile.runtime.package import load_package
from edit_mobile.runtime.tiling import Tiling, run_tiled, tile_starts, tiles


@pytest.mark.parametrize("length,tile,overlap,align", [(32, 16, 4, 1), (37, 16, 4, 1), (96, 32, 8, 8), (64, 64, 8, 1)])
def test_tiles_cover_the_input_with_the_overlap(length, tile, overlap, align):
    starts = tile_starts(length, tile, overlap, align)
    assert starts[0] == 0 and starts[-1] + tile == length or (length <= tile and starts == [0])
    assert all(s % align == 0 for s in starts) and starts == sorted(set(starts))
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap
    if len(starts) > 1:  # the fewest tiles: one fewer could not cover the input with that overlap
        assert (len(starts) - 1) * (tile - overlap) + overlap < length


@pytest.mark.parametrize("scale", [8, 1 / 8])
def test_blend_is_exact_without_spatial_context(scale):
    """A per-pixel op (nearest up- or down-sampling by 8, like a VAE decoder / encoder without context) tiled and
    blended equals the op on the whole input: the weights of overlapping tiles sum to one everywhere."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 40 * 8, 56 * 8) if scale < 1 else (1, 4, 40, 56)).astype(np.float32)
    if scale > 1:
        op = lambda t: np.repeat(np.repeat(t * 2 + 1, 8, axis=-1), 8, axis=-2)  # noqa: E731
        tiling = Tiling((16, 16), 4)
    else:
        op = lambda t: t[..., ::8, ::8] * 2 + 1  # noqa: E731
        tiling = Tiling((128, 128), 32, align=8)
    got = run_tiled(op, x, tiling)
    assert got.dtype == np.float32 and got.shape == op(x).shape
    np.testing.assert_allclose(got, op(x), rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(op(x)).max())
    assert len(tiles(x, tiling)) > 4  # really tiled: several rows and columns


@pytest.fixture(scope="module")
def tiled(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiled") / "pkg"
    src = str(tiny_dirs["tiny-pixart-edit-trained"])
    assert cli(["export", src, "--resolution", "256", "--vae-tile", "128", "--out", str(out)]) == 0
    return out


def test_tiled_package_validates_and_quantizes(tiled, tiny_dirs, tmp_path):
    package = load_package(tiled)
    decoder = package.components["vae_decoder"].entry
    assert decoder.tiling == Tiling((16, 16), 4) and decoder.inputs[0].shape == (1, 4, 32, 32)
    graph = json.loads((tiled / "manifest.json").read_text())["export"]["vae_decoder"]
    assert max(graph["onnx_vs_torch_max_abs"].values()) < 1e-4  # the tile graph against PyTorch at export
    ref = str(tiny_dirs["tiny-pixart-edit-trained"])
    report = tmp_path / "report.json"
    assert cli(["validate", str(tiled), "--reference", ref, "--steps", "2", "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    for name in ("vae_decoder", "vae_encoder"):  # the graphs exactly; the blend against one untiled pass reported
        assert r["components"][name]["psnr_db"] >= 60 and 15 < r["components"][name]["untiled"]["psnr_db"] < 100
    assert r["image"]["gate_db"] is None and r["loop"]["passed"]
    out = tmp_path / "int8"
    argv = ["quantize", str(tiled), "--precision", "int8-weights", "--components", "vae_decoder"]
    assert cli([*argv, "--calibration-steps", "2", "--out", str(out)]) == 0
    assert load_package(out).components["vae_decoder"].entry.tiling == decoder.tiling
    assert cli(["validate", str(out), "--reference", ref, "--steps", "2"]) == 0


@pytest.mark.parametrize("tile", ["100", "256", "16"])
def test_a_bad_tile_is_refused_in_one_line(tiny_dirs, tmp_path, capsys, tile):
    out = tmp_path / "pkg"
    argv = ["export", str(tiny_dirs["tiny-pixart"]), "--resolution", "256", "--vae-tile", tile, "--out", str(out)]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("edit-mobile export: error: --vae-tile") and not out.exists()


@pytest.mark.parametrize(
    "tiling,message",
    [
        ({"tile": [16, 16], "overlap": 16}, "tiling.overlap"),
        ({"tile": [64, 16], "overlap": 4}, "tiling.tile"),
        ({"tile": [16, 16], "overlap": 4, "align": 3}, "tiling.align"),
        ({"tile": 16, "overlap": 4}, "tiling.tile"),
    ],
)
def test_a_malformed_tiling_is_refused(tiled, tmp_path, tiling, message):
    pkg = tmp_path / "pkg"
    shutil.copytree(tiled, pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["components"]["vae_decoder"]["tiling"] = tiling
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=message):
        load_package(pkg)
