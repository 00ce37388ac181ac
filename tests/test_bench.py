"""`edit-mobile bench`: every report field present and sane on a tiny package; bad input -> one error line, exit 2."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

from edit_mobile.cli.main import main


@pytest.fixture(scope="module")
def tiny_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "pkg"
    assert main(["export", "tiny-pixart", "--target", "onnx", "--resolution", "256", "--out", str(out)]) == 0
    return out


@pytest.fixture
def study(monkeypatch):
    """Loads a study module from scripts/ (developer scripts are not installed: scripts/ is their import root, put on
    the path for the test), e.g. study("studies.scaling.report") or study("bench_gpu")."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    return importlib.import_module


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def test_bench_json_fields(tiny_package, tmp_path, capsys):
    out = tmp_path / "b.json"
    assert (
        main(
            [
                "bench",
                str(tiny_package),
                "--runs",
                "3",
                "--warmup",
                "1",
                "--steps",
                "2",
                "--threads",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
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


def test_memory_phases_in_both_modes(tiny_package, tmp_path):
    """One image per memory mode, each in a fresh process, with the peak of every phase (Linux resets the
    high-water mark between phases): low-memory mode creates no session before the loop needs it."""
    out = tmp_path / "b.json"
    argv = ["bench", str(tiny_package), "--runs", "1", "--warmup", "0", "--steps", "2", "--memory-phases"]
    assert main([*argv, "--json", str(out)]) == 0
    phases = json.loads(out.read_text())["memory_phases"]
    for mode in ("default", "low"):
        r = phases[mode]
        assert all(_positive(r[p]) for p in ("load", "text_encoding", "denoising", "decoding", "baseline_mb"))
        assert r["peak_rss_mb"] == max(r[p] for p in ("load", "text_encoding", "denoising", "decoding"))
    # default mode: every session exists after loading; low mode: none yet (only the tokenizers and the manifest)
    assert phases["low"]["load"] < phases["default"]["load"]
    assert phases["low_vs_default_peak"] == round(phases["low"]["peak_rss_mb"] / phases["default"]["peak_rss_mb"], 3)


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["--runs", "0"], "--runs must be >= 1"),
        (["--backend", "tpu"], "unknown backend 'tpu'"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--shared-arena", "--no-cpu-arena"], "--shared-arena needs the CPU arena"),
    ],
)
def test_bench_bad_options(tiny_package, capsys, argv_tail, message):
    assert main(["bench", str(tiny_package), *argv_tail]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bench_missing_package(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1


# --- the scaling study's and the GPU script's building blocks (no study run: that takes minutes) -----------------
def test_graph_macs_counts_matmul_gemm_conv(tmp_path, study):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((8, 16), np.float32), "W")
    k = numpy_helper.from_array(np.zeros((4, 2, 3, 3), np.float32), "K")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Conv", ["img", "K"], ["z"], pads=[1] * 4)],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, 8]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 2, 6, 6]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 16]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 6, 6]),
        ],
        [w, k],
    )
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert study("studies.scaling.report").graph_macs(path) == {"macs": 5 * 16 * 8 + 4 * 36 * 2 * 9, "uncounted": []}


def test_study_ratios_stay_inside_a_group(study):
    report = study("studies.scaling.report")
    merge_reports, ratios = report.merge_reports, report.ratios

    def row(group, variant, ms, run="r1", status="ok", rss=100.0):
        r = {
            "arch": "pixart",
            "resolution": 1024,
            "depth": 2,
            "group": group,
            "variant": variant,
            "run": run,
            "status": status,
            "peak_rss_mb": rss,
        }
        if ms:
            r.update(median_ms=ms, min_ms=ms)
        return r

    rows = [
        row("attention", "softmax", 6000),
        row("attention", "edit", 4000, rss=50.0),
        row("int8", "edit", 4400),
        row("int8", "edit-int8", 2200),
        row("int8", "softmax-int8", None, status="oom"),
    ]
    got = {(q["group"], q["slow"], q["fast"]): q for q in ratios(rows)}
    assert got[("attention", "softmax", "edit")]["speedup"] == 1.5
    assert got[("attention", "softmax", "edit")]["memory_ratio"] == 2.0
    assert got[("int8", "edit", "edit-int8")]["speedup"] == 2.0
    assert got[("int8", "softmax-int8", "edit-int8")]["speedup"] is None  # the teacher ran out of memory
    assert ("int8", "softmax", "edit") not in got  # never across groups

    old = {"runs": [{"started": "r0", "command": "old"}], "results": [dict(r, run="r0") for r in rows]}
    new = {"runs": [{"started": "r1", "command": "new"}], "results": [row("int8", "edit", 4000)]}
    merged = merge_reports(old, new)
    assert [r["run"] for r in merged["results"] if r["group"] == "int8"] == ["r1"]
    assert {r["started"] for r in merged["runs"]} == {"r0", "r1"}


def test_bench_gpu_runs_on_cpu(capsys, study):
    bench_gpu = study("bench_gpu").main

    rows = bench_gpu(["--device", "cpu", "--quick", "--modes", "eager", "--resolutions", "128", "--repeats", "1"])
    assert len(rows) == 1 and rows[0]["softmax_status"] == "ok" and rows[0]["edit_status"] == "ok"
    assert rows[0]["softmax_ms"] > 0 and rows[0]["edit_ms"] > 0 and rows[0]["speedup"] > 0


def test_scaling_study_parent_is_torch_free():
    """The study's parent process and its ONNX Runtime workers import the plan, study, worker and report modules
    without torch (only the export / PyTorch children import it)."""
    import subprocess
    import sys

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    code = (
        f"import sys; sys.path.insert(0, {str(scripts)!r})\n"
        "import studies.scaling.plan, studies.scaling.study, studies.scaling.worker, studies.scaling.report\n"
        "import bench_scaling\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_attention_free_bound_keeps_the_projections_and_drops_the_core(study, tmp_path):
    """The study's bound (issue 17): every PixArt self-attention computes to_out(to_v(x)) exactly, and its ONNX
    graph still runs all four projections (Q and K are not pruned as dead code) but no attention product."""
    import onnx
    import torch

    models = study("studies.scaling.models")
    desc = models.describe("pixart")
    bound, teacher = models.build_model(desc, "bound", 256, 1), models.build_model(desc, "softmax", 256, 1)
    attn = bound.transformer_blocks[0].attn1
    x = torch.randn(1, 16, desc["heads"] * desc["head_dim"])
    with torch.no_grad():
        assert torch.equal(attn(x), attn.to_out[0](attn.to_v(x)))
        assert not torch.allclose(teacher.transformer_blocks[0].attn1(x), attn(x))  # same weights, a real core
    path = tmp_path / "attn1.onnx"
    torch.onnx.export(attn, (x,), str(path), dynamo=False)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMul") + ops.count("Gemm") == 4 and "Softmax" not in ops


def test_study_architectures_come_from_the_presets(study):
    """The PixArt-Σ-XL the studies measure is the `pixart-sigma-xl` preset's transformer, at the study's depth and
    size; the scaling study's timing inputs fit the export spec of that model."""
    archs, models, plan = study("studies.archs"), study("studies.scaling.models"), study("studies.scaling.plan")
    from edit_mobile.models.presets import PRESETS

    desc = models.describe("pixart")
    assert (desc["heads"], desc["head_dim"], desc["context_channels"], desc["full_depth"]) == (16, 72, 4096, 28)
    assert (desc["vae_factor"], desc["patch"], plan.tokens(1024, desc)) == (8, 2, 4096)
    model = models.build_model(desc, "edit", 256, 1)
    assert type(model).__name__ == "EDiTPixArtTransformer2DModel" and len(model.transformer_blocks) == 1
    teacher_config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    preset_config = archs.transformer_config("pixart-sigma-xl")
    same = ("num_attention_heads", "attention_head_dim", "caption_channels", "norm_type", "attention_bias")
    assert all(teacher_config[k] == preset_config[k] for k in same)
    assert teacher_config["sample_size"] == 32 and preset_config["sample_size"] == 128
    assert preset_config["_class_name"] == "PixArtTransformer2DModel" and "pixart-sigma-xl" in PRESETS
    spec = models.transformer_spec(desc, model, 256, 1)
    feeds = models.timing_inputs(desc, 256, 1)
    assert {s.name: tuple(s.shape) for s in spec.inputs} == {k: v.shape for k, v in feeds.items()}

    class Args:  # the options plan() reads
        quick, int8, torch, with_optimum, full_depth, full_depth_res = False, True, False, False, True, 2048
        archs, resolutions, sd3_resolutions, groups = ["pixart"], [256], [], ["attention", "full-depth"]
        depth, warmup, runs, runs_large, call_timeout = 2, 1, 3, 2, 900.0

    steps = plan.plan(Args, {"pixart": desc})
    assert [(s["group"], s["depth"]) for s in steps] == [("attention", 2), ("full-depth", 28)]
    assert steps[0]["variants"] == ["softmax", "softmax-mha", "softmax-bound", "softmax-bound-mha", "edit", "edit-mha"]


def test_worker_killed_between_calls_is_recorded(study):
    """A worker the kernel's out-of-memory killer ended (SIGKILL) while another worker of its group ran: the next
    call records it as oom instead of ending the study with a BrokenPipeError (seen with SD3 at 1024²)."""
    import subprocess

    worker = study("studies.scaling.worker")
    w = worker.Worker.__new__(worker.Worker)  # the parent side only: no real worker process to start
    w.variant, w.timeout_s, w.limit, w.killed_for_memory = "softmax", 5.0, 2**30, False
    w.status, w.message, w.times, w.result = "ok", "", [], {}
    w.proc = subprocess.Popen(["sh", "-c", "kill -9 $$"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    w.proc.wait()
    w.run()
    assert (w.status, w.times) == ("oom", []) and "between calls" in w.message
    w.quit()  # nothing more to send
    assert w.status == "oom"


def test_edit_configuration_variants(study):
    """The edit-config group: EDiT's ConvFusion reduction and compressor stride by variant name, fused as shipped,
    beside the attention-free bound; a misspelt variant is refused rather than measured as the default."""
    from edit_mobile.models.edit_attention import EDiTConfig

    models, plan = study("studies.scaling.models"), study("studies.scaling.plan")
    assert models.edit_config_of("edit") == EDiTConfig()
    assert models.edit_config_of("edit-r8-s4") == EDiTConfig(convfusion_reduction=8, kv_stride=4)
    assert models.edit_config_of("edit-s4") == EDiTConfig(kv_stride=4)
    assert models.edit_config_of("edit-sep") == EDiTConfig(convfusion="separable")
    assert models.edit_config_of("edit-r8-nocf") == EDiTConfig(convfusion_reduction=8, convfusion="off")
    with pytest.raises(ValueError, match="unknown EDiT variant 'edit-x8'"):
        models.edit_config_of("edit-x8")

    class Args:
        quick, int8, torch, with_optimum, full_depth, full_depth_res = False, True, False, False, False, 2048
        archs, resolutions, sd3_resolutions, groups = ["pixart", "sd3"], [1024], [1024], ["edit-config"]
        depth, warmup, runs, runs_large, call_timeout = 2, 1, 3, 2, 900.0

    desc = {"pixart": {"full_depth": 28}, "sd3": {"full_depth": 24}}
    steps = plan.plan(Args, desc)
    assert [(s["arch"], s["group"]) for s in steps] == [("pixart", "edit-config")]  # PixArt only
    assert steps[0]["variants"] == [
        "softmax-bound-mha",
        *("edit-mha", "edit-r8-mha", "edit-s4-mha", "edit-r8-s4-mha", "edit-sep-mha", "edit-nocf-mha"),
    ]
    Args.resolutions = [2048]  # the workers of a group live together: five of them at 2048²
    large = plan.plan(Args, desc)[0]["variants"]
    assert large == ["softmax-bound-mha", "edit-mha", "edit-r8-mha", "edit-sep-mha", "edit-nocf-mha"]


def test_memory_group_measures_the_runtime_setting_and_onnx_runtimes_default(study):
    """The memory group: each fused graph with ONNX Runtime's memory pattern off (as our runtime runs packages) and
    on ("+pattern", ONNX Runtime's default), at the arena resolutions; the worker spec carries the choice."""
    plan = study("studies.scaling.plan")

    class Args:
        quick, int8, torch, with_optimum, full_depth, full_depth_res = False, True, False, False, False, 2048
        archs, resolutions, sd3_resolutions, groups = ["pixart", "sd3"], [1024], [1024], ["memory"]
        depth, warmup, runs, runs_large, call_timeout, arena_resolutions = 2, 1, 3, 2, 900.0, [2048]

    steps = plan.plan(Args, {"pixart": {"full_depth": 28}, "sd3": {"full_depth": 24}})
    assert [(s["arch"], s["res"], s["group"]) for s in steps] == [("pixart", 2048, "memory")]
    variants = steps[0]["variants"]
    plain = [v for v in variants if "+" not in v]
    assert sorted(v for v in variants if v.endswith("+pattern")) == sorted(f"{v}+pattern" for v in plain)
    assert {v.partition("+")[0] for v in variants} == {"softmax-mha", "softmax-bound-mha", "edit-mha"}
