"""`edit-mobile bench`: every report field present and sane on a tiny package; bad input -> one error line, exit 2."""

from __future__ import annotations

import json

import pytest

from edit_mobile.scripts.cli import main


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "pkg"
    assert main(["export", "tiny-pixart", "--target", "onnx", "--resolution", "256", "--out", str(out)]) == 0
    return out


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_bench_json_fields(tiny_package, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", str(tiny_package), "--runs", "3", "--warmup", "1", "--steps", "2", "--threads", "1",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "end to end" in printed and "runtime overhead" in printed
    r = json.loads(out.read_text())

    assert set(r["components"]) == {"text_encoder", "transformer", "vae_decoder", "vae_encoder"}
    for name, c in r["components"].items():
        for key in ("median_ms", "p10_ms", "p90_ms", "mean_ms", "min_ms", "load_s", "size_mb"):
            assert _positive(c[key]), (name, key, c[key])
        assert c["p10_ms"] <= c["median_ms"] <= c["p90_ms"]
        assert c["runs"] == 3
    # CFG on a batch-2 package: one transformer call per step, one prompt + one negative prompt encoding
    assert r["components"]["transformer"]["calls_per_image"] == 2
    assert r["components"]["text_encoder"]["calls_per_image"] == 2
    assert r["components"]["vae_decoder"]["calls_per_image"] == 1
    assert r["components"]["vae_encoder"]["calls_per_image"] == 0

    for block in (r["end_to_end"], r["transformer_step"], r["overhead"]):
        assert block["p10_ms"] <= block["median_ms"] <= block["p90_ms"]
        assert _positive(block["median_ms"])
    assert r["end_to_end"]["runs"] == 3 and r["end_to_end"]["steps"] == 2
    assert r["transformer_step"]["runs"] == 3 * 2
    for key in ("overhead_ms", "peak_rss_mb", "size_mb", "load_s", "components_in_loop_ms"):
        assert _positive(r[key]), (key, r[key])
    assert r["overhead_ms"] < r["end_to_end"]["median_ms"]
    assert r["components_in_loop_ms"] < r["end_to_end"]["median_ms"]
    assert 0 < r["overhead_pct"] < 100
    assert r["load_s"] == pytest.approx(sum(c["load_s"] for c in r["components"].values()), abs=0.01)
    assert r["size_mb"] >= sum(c["size_mb"] for c in r["components"].values())
    m = r["machine"]
    assert m["cpu"] and m["logical_cores"] >= 1 and m["threads"] == 1
    assert m["versions"]["onnxruntime"] and m["versions"]["numpy"]
    assert r["package"]["family"] == "pixart" and r["package"]["resolution"] == [256, 256]


@pytest.mark.parametrize("argv_tail, message", [
    (["--runs", "0"], "--runs must be >= 1"),
    (["--backend", "tpu"], "unknown backend 'tpu'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
])
def test_bench_bad_options(tiny_package, capsys, argv_tail, message):
    assert main(["bench", str(tiny_package), *argv_tail]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bench_missing_package(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1
