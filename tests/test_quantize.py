"""edit-mobile quantize: every precision on tiny-pixart EDiT and tiny-sd3 MM-EDiT passes its gate in
edit-mobile validate; mixed precisions; calibration on real trajectories; fp16 safety; bad input."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import onnx
import pytest

from edit_mobile.cli.main import main as cli
from edit_mobile.runtime.manifest import GATES_DB, ONNX_PRECISIONS

FAMILIES = {"pixart": "tiny-pixart-edit-trained", "sd3": "tiny-sd3-mm-edit-trained"}
PRECISIONS = list(ONNX_PRECISIONS)
GATES = {p: GATES_DB[p] for p in PRECISIONS}
CALIB = ["--calibration-steps", "2"]
VALIDATE = ["--steps", "2"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a blue square next to a yellow triangle\n\na photograph of a cat on a windowsill\n")
    return path


@pytest.fixture(scope="module")
def packages(tiny_dirs, tmp_path_factory):
    """One fp32 ONNX export per family, at 128x128 (the smallest resolution the tiny VAE and patch allow)."""
    root = tmp_path_factory.mktemp("fp32")
    out = {}
    for family, src in FAMILIES.items():
        out[family] = root / family
        assert cli(["export", str(tiny_dirs[src]), "--resolution", "128", "--out", str(out[family])]) == 0
    return out


@pytest.fixture(scope="module")
def quantized(packages, prompts, tmp_path_factory):
    """Lazily made quantized packages, shared by the tests of this module: (family, precision) -> folder."""
    root = tmp_path_factory.mktemp("quantized")
    cache = {}

    def get(family: str, precision: str):
        if (family, precision) not in cache:
            out = root / f"{family}-{precision}"
            assert (
                cli(
                    [
                        "quantize",
                        str(packages[family]),
                        "--precision",
                        precision,
                        "--out",
                        str(out),
                        "--calibration-prompts",
                        str(prompts),
                        *CALIB,
                    ]
                )
                == 0
            )
            cache[family, precision] = out
        return cache[family, precision]

    return get


def _manifest(pkg):
    return json.loads((pkg / "manifest.json").read_text())


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_precision_passes_its_gate(quantized, tiny_dirs, tmp_path, family, precision):
    pkg = quantized(family, precision)
    report_path = tmp_path / "report.json"
    assert (
        cli(
            [
                "validate",
                str(pkg),
                "--reference",
                str(tiny_dirs[FAMILIES[family]]),
                *VALIDATE,
                "--json",
                str(report_path),
            ]
        )
        == 0
    )
    report = json.loads(report_path.read_text())
    quantized_components = _manifest(pkg)["quantization"]["components"]
    assert set(quantized_components.values()) == {precision}
    for name, c in report["components"].items():
        if name in quantized_components:
            assert c["precision"] == precision and c["gate_db"] == GATES[precision] and c["psnr_db"] >= GATES[precision]
        else:
            assert c["precision"] == "fp32" and c["gate_db"] == 60.0
    # Quantized packages: the image PSNR against fp32 PyTorch is reported, not gated.
    assert report["image"]["gate_db"] is None and report["image"]["psnr_db"] > 20
    if precision == "fp16":
        assert all(c["fp16_safety"]["finite"] for c in report["components"].values())
        assert report["components"]["transformer"]["fp16_safety"]["checks"] == 2  # every step


def test_default_components_and_manifest(quantized, packages):
    src = _manifest(packages["sd3"])
    fp16, int8 = _manifest(quantized("sd3", "fp16")), _manifest(quantized("sd3", "int8-dynamic"))
    assert set(fp16["quantization"]["components"]) == set(src["components"])  # fp16: every model
    assert set(int8["quantization"]["components"]) == {
        "transformer",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
    }  # int8: the VAE stays fp32
    for name, entry in int8["components"].items():
        if name in int8["quantization"]["components"]:
            q = entry["quantization"]
            assert entry["precision"] == "int8-dynamic" and entry["gate_psnr_db"] == 25.0
            assert q["source_precision"] == "fp32" and q["method"].endswith("quantize_dynamic")
            assert q["calibration"]["prompts"] == 2 and q["calibration"]["steps"] == 2
            assert entry["files"] != src["components"][name]["files"]
            assert q["size_bytes"]["quantized"] < q["size_bytes"]["fp32"]
        else:  # copied unchanged
            assert entry == src["components"][name]
    assert int8["quantization"]["calibration"]["prompts"] == 2
    assert int8["quantization"]["calibration"]["samples"]["transformer"] == 2 * 2  # 2 prompts x 2 steps


def _matmul_weight_range(pkg, op_type):
    """The largest |int8 value| among the linear layers' weights (2-D int8 constants) read by op_type's nodes
    (MatMulInteger: input 1; QDQ: DequantizeLinear's input 0) in the package's transformer."""
    from onnx import numpy_helper

    model = onnx.load(str(pkg / "transformer" / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    slot = 1 if op_type == "MatMulInteger" else 0
    names = [n.input[slot] for n in model.graph.node if n.op_type == op_type]
    weights = [inits[n] for n in names if n in inits and inits[n].dtype == np.int8 and inits[n].ndim == 2]
    assert weights, f"no int8 MatMul weights found through {op_type}"
    return max(int(np.abs(w.astype(np.int32)).max()) for w in weights)


@pytest.mark.parametrize("precision,op_type", [("int8-dynamic", "MatMulInteger"), ("int8-static", "DequantizeLinear")])
def test_full_range_weights_use_8_bits_and_the_default_7(quantized, packages, prompts, tmp_path, precision, op_type):
    """7-bit weights by default (AVX2-only x86 saturates with 8); --full-range-weights stores the whole int8 range,
    for CPUs that accumulate in int32; the manifest says which."""
    default = quantized("pixart", precision)
    full = tmp_path / "full"
    argv = ["quantize", str(packages["pixart"]), "--precision", precision, "--components", "transformer"]
    assert cli([*argv, "--full-range-weights", "--calibration-prompts", str(prompts), *CALIB, "--out", str(full)]) == 0
    assert _matmul_weight_range(default, op_type) <= 64 < 100 <= _matmul_weight_range(full, op_type)
    bits = [_manifest(p)["components"]["transformer"]["quantization"]["weight_range_bits"] for p in (default, full)]
    assert bits == [7, 8]


def test_int8_dynamic_quantizes_every_linear_layer_and_conv_weight(quantized):
    """The exported graphs fuse Linear layers into Gemm; none may be left in fp32, nor any Conv weight."""
    from edit_mobile.runtime.backends import component_backend
    from edit_mobile.runtime.package import load_package

    pkg = quantized("pixart", "int8-dynamic")
    model = onnx.load(str(pkg / "transformer" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert "Gemm" not in ops and "MatMulInteger" in ops
    float_weights = [
        t.name
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2 and np.prod(t.dims) >= 32 * 32
    ]
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    assert not conv_weights & set(float_weights)
    entry = _manifest(pkg)["components"]["transformer"]
    # Convs: the patch embedding and, per block (2), ConvFusion's 3x3 conv and the two compressors; ConvFusion's
    # 1x1 output is a MatMul (models/edit_attention.py), quantized with the linear layers
    assert entry["quantization"]["gemm_unfused"] > 10 and entry["quantization"]["conv_weights_int8"] == 7
    assert entry["ort_session_config"] == {"session.disable_quant_qdq": "1"}
    backend = component_backend(load_package(pkg), "transformer")  # the runtime applies it
    assert backend.session.get_session_options().get_session_config_entry("session.disable_quant_qdq") == "1"


def test_int8_weights_are_int8_with_fp32_compute(quantized):
    model = onnx.load(str(quantized("pixart", "int8-weights") / "transformer" / "model.onnx"))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(a.i == 8 for n in nbits for a in n.attribute if a.name == "bits")


def _nbits(pkg, component="transformer") -> dict[str, int]:
    model = onnx.load(str(pkg / component / "model.onnx"))
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    return {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in nodes}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_int4_weights_are_4bit_and_smaller_than_int8(quantized, family):
    int4, int8 = quantized(family, "int4-weights"), quantized(family, "int8-weights")
    assert _nbits(int4) and set(_nbits(int4).values()) == {4}
    q4, q8 = (_manifest(p)["components"]["transformer"]["quantization"] for p in (int4, int8))
    assert q4["block_size"] == 32 and q4["kept_8bit"] == [] and q8["block_size"] == 128
    assert q4["size_bytes"]["quantized"] < 0.8 * q8["size_bytes"]["quantized"]


def test_keep_8bit_gives_the_most_sensitive_groups_8_bits(packages, prompts, quantized, tmp_path):
    out = tmp_path / "int4-keep"
    argv = ["quantize", str(packages["pixart"]), "--precision", "int4-weights", "--components", "transformer"]
    assert cli([*argv, "--keep-8bit", "2", "--calibration-prompts", str(prompts), *CALIB, "--out", str(out)]) == 0
    q = _manifest(out)["components"]["transformer"]["quantization"]
    scores = q["keep_8bit"]["group_psnr_db_at_4bit"]
    worst = sorted(scores, key=scores.get)[:2]
    assert q["keep_8bit"]["groups"] == worst and len(scores) > 4
    bits = _nbits(out)
    in_worst = {n: b for n, b in bits.items() if any(n.startswith(g + "/") for g in worst)}
    assert in_worst and set(in_worst.values()) == {8}
    assert set(b for n, b in bits.items() if n not in in_worst) == {4}
    # The 8-bit layers are the ones that lost the most alone: the whole model is no worse than all-4-bit.
    all4 = _manifest(quantized("pixart", "int4-weights"))["components"]["transformer"]["quantization"]
    assert q["check"]["psnr_db"] >= all4["check"]["psnr_db"] - 0.5


def test_fp16_keeps_linear_attention_and_norm_statistics_fp32(quantized):
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    pkg = quantized("pixart", "fp16")
    q = _manifest(pkg)["components"]["transformer"]["quantization"]
    blocked = q["fp16_blocked_nodes"]
    assert (
        blocked["linear-attention"]
        and blocked["normalization"]
        and set(q["fp16_block_reasons"]) >= {"linear-attention", "normalization"}
    )
    # ONNX Runtime's symbolic shape inference: onnx's own stops at the fused com.microsoft operators
    model = SymbolicShapeInference.infer_shapes(onnx.load(str(pkg / "transformer" / "model.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.output]}
    nodes = {n.name: n for n in model.graph.node}
    for name in blocked["linear-attention"]:
        assert types[nodes[name].output[0]] == onnx.TensorProto.FLOAT, name
    skip_norms = [n.name for n in model.graph.node if n.op_type == "SkipLayerNormalization"]
    assert skip_norms and set(skip_norms) <= set(blocked["normalization"])  # the fused graph's residual + norm
    assert all(types[nodes[n].output[0]] == onnx.TensorProto.FLOAT for n in skip_norms)
    products = [
        n for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in blocked["linear-attention"]
    ]
    assert products and all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in products)
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert set(inputs.values()) == {onnx.TensorProto.FLOAT}  # fp32 inputs / outputs kept


def test_mixed_precisions_in_one_package(packages, prompts, tiny_dirs, tmp_path):
    out = tmp_path / "mixed"
    assert (
        cli(
            [
                "quantize",
                str(packages["pixart"]),
                "--precision",
                "transformer=int8-dynamic,vae_decoder=fp16",
                "--out",
                str(out),
                "--calibration-prompts",
                str(prompts),
                *CALIB,
            ]
        )
        == 0
    )
    m = _manifest(out)
    assert m["validation"] is None
    assert {n: c["precision"] for n, c in m["components"].items()} == {
        "text_encoder": "fp32",
        "transformer": "int8-dynamic",
        "vae_decoder": "fp16",
        "vae_encoder": "fp32",
    }
    # ... and a second pass over a still-fp32 component of that package
    out2 = tmp_path / "mixed2"
    assert (
        cli(
            [
                "quantize",
                str(out),
                "--precision",
                "int8-weights",
                "--components",
                "text_encoder",
                "--out",
                str(out2),
                "--calibration-prompts",
                str(prompts),
                *CALIB,
            ]
        )
        == 0
    )
    assert _manifest(out2)["components"]["text_encoder"]["precision"] == "int8-weights"
    assert _manifest(out2)["components"]["transformer"]["precision"] == "int8-dynamic"
    assert cli(["validate", str(out2), "--reference", str(tiny_dirs[FAMILIES["pixart"]]), *VALIDATE]) == 0


def test_ort_mobile_package_gets_ort_files_and_operator_config(tiny_dirs, prompts, tmp_path):
    src, out = tmp_path / "ort", tmp_path / "ort-int8"
    assert (
        cli(
            [
                "export",
                str(tiny_dirs[FAMILIES["pixart"]]),
                "--target",
                "ort-mobile",
                "--resolution",
                "128",
                "--out",
                str(src),
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "quantize",
                str(src),
                "--precision",
                "int8-dynamic",
                "--components",
                "transformer",
                "--out",
                str(out),
                "--calibration-prompts",
                str(prompts),
                *CALIB,
            ]
        )
        == 0
    )
    entry = _manifest(out)["components"]["transformer"]
    assert entry["path"] == "transformer/model.ort" and "transformer/model.ort" in entry["files"]
    assert "MatMulInteger" in (out / "required_operators.config").read_text()


def test_sensitivity_pass_reports_exclusions(packages, prompts, tmp_path, monkeypatch):
    from edit_mobile.export import quantize as quantize_module

    # The pass aims at gate + SENSITIVITY_MARGIN_DB; neither the CLI nor quantize_package lets a caller set that
    # target, so the test raises the module's margin until the target is unreachable. Then the exclusion path always
    # runs (whatever this CPU's int8 kernels score) and stops at its cap: the worst groups, worst first.
    margin = 1000.0
    monkeypatch.setattr(quantize_module, "SENSITIVITY_MARGIN_DB", margin)
    out = tmp_path / "sens"
    assert (
        cli(
            [
                "quantize",
                str(packages["sd3"]),
                "--precision",
                "int8-static",
                "--components",
                "text_encoder_2",
                "--sensitivity",
                "--out",
                str(out),
                "--calibration-prompts",
                str(prompts),
                *CALIB,
            ]
        )
        == 0
    )
    q = _manifest(out)["components"]["text_encoder_2"]["quantization"]
    s = q["sensitivity"]
    assert s["target_psnr_db"] == GATES_DB["int8-static"] + margin
    groups = s["group_psnr_db"]
    assert len(groups) >= 4
    worst_first = sorted(groups, key=groups.get)
    cap = max(1, int(len(groups) * quantize_module.SENSITIVITY_MAX_FRACTION))
    assert s["excluded_groups"] == worst_first[:cap], (s["excluded_groups"], groups)
    assert s["excluded_groups"][0] == min(groups, key=groups.get)
    # Every node of the excluded groups stays float in the result, recorded with its reason.
    assert s["excluded_nodes"] and all(q["excluded_nodes"][n] == "sensitivity" for n in s["excluded_nodes"])
    history = s["psnr_db_after_each_exclusion"]
    assert len(history) == len(s["excluded_groups"]) + 1
    # Keeping the worst group in float improves the whole component (33.9 -> 40.4 dB measured), and the written
    # model is the one the pass measured last (same exclusions, same calibration, same check inputs).
    assert history[1] > history[0] and history[-1] > history[0], history
    assert abs(q["check"]["psnr_db"] - history[-1]) <= 0.01, (q["check"], history)


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2", "text_encoder_3"])
def test_embedding_tables_are_int8_rows_gathered_before_dequantizing(packages, tmp_path, component):
    """T5's and CLIP's token tables become int8 with a scale per row; the lookup gathers int8 rows and their scales,
    so the output equals the fp32 graph whose table is the dequantized one, bit for bit."""
    from edit_mobile.export import quantize_onnx as qo

    src = packages["sd3"] / component / "model.onnx"
    model = qo.load_model(src)
    inits = {t.name: t for t in model.graph.initializer}
    tables = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits}
    assert tables and qo.int8_embedding_tables(model) >= len(tables)
    after = {t.name: t for t in model.graph.initializer}
    assert not tables & set(after)  # the fp32 tables are gone
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in after]
    assert {after[n.input[0]].data_type for n in gathers} == {onnx.TensorProto.INT8, onnx.TensorProto.FLOAT}
    qo.save_model(model, tmp_path / "int8.onnx")

    reference = qo.load_model(src)  # the same graph with each table replaced by its dequantization
    for t in reference.graph.initializer:
        if t.name in tables:
            q, scale = (onnx.numpy_helper.to_array(after[f"{t.name}__{s}"]) for s in ("int8", "row_scale"))
            t.CopyFrom(onnx.numpy_helper.from_array(q.astype(np.float32) * scale, t.name))
    qo.save_model(reference, tmp_path / "dequantized.onnx")
    shape = _input_shape(model, "input_ids")
    feed = {"input_ids": (np.arange(np.prod(shape)).reshape(shape) % 50).astype(np.int64)}
    a, b, fp32 = (qo.run_feeds(p, [feed])[0][0] for p in (tmp_path / "int8.onnx", tmp_path / "dequantized.onnx", src))
    assert np.array_equal(a, b)
    assert 35 < qo.psnr(fp32, a) < 200  # int8 rows: close to fp32, yet not fp32


def _input_shape(model, name):
    return [d.dim_value for i in model.graph.input if i.name == name for d in i.type.tensor_type.shape.dim]


def test_text_encoder_inputs_without_running_the_loop_equal_the_loops(packages, prompts):
    """Quantizing only text encoders records their inputs by tokenizing alone; they are the loop's own."""
    from edit_mobile.export.calibration import read_prompt_file, record_calibration, record_text_inputs
    from edit_mobile.runtime.package import load_package

    pkg = load_package(packages["sd3"])
    texts = read_prompt_file(prompts)
    loop, tokenized = record_calibration(pkg, texts, steps=1), record_text_inputs(pkg, texts, ["text_encoder_3"])
    assert set(tokenized.feeds) == {"text_encoder_3"}
    assert len(tokenized.feeds["text_encoder_3"]) == len(loop.feeds["text_encoder_3"]) == 4
    for a, b in zip(tokenized.feeds["text_encoder_3"], loop.feeds["text_encoder_3"]):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_calibration_without_decoding_records_the_same_inputs_and_runs_no_decoder(packages, prompts, monkeypatch):
    """Without a VAE encoder to calibrate, the decode is skipped: every other component's inputs are the same,
    the decoder never runs and the VAE encoder gets no inputs."""
    from edit_mobile.export.calibration import read_prompt_file, record_calibration
    from edit_mobile.runtime.package import load_package
    from edit_mobile.runtime.pipeline import Text2ImagePipeline

    pkg = load_package(packages["pixart"])
    texts = read_prompt_file(prompts)
    full = record_calibration(pkg, texts, steps=2)
    decodes = []
    real_decode = Text2ImagePipeline.decode
    monkeypatch.setattr(Text2ImagePipeline, "decode", lambda *a, **k: decodes.append(1) or real_decode(*a, **k))
    undecoded = record_calibration(pkg, texts, steps=2, decode=False)
    assert not decodes
    assert full.feeds["vae_encoder"] and not undecoded.feeds["vae_encoder"]
    for name in ("text_encoder", "transformer", "vae_decoder"):
        assert len(full.feeds[name]) == len(undecoded.feeds[name]) > 0
        for a, b in zip(full.feeds[name], undecoded.feeds[name]):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_calibration_records_every_step_of_the_trajectory(packages, prompts):
    from edit_mobile.export.calibration import read_prompt_file, record_calibration
    from edit_mobile.runtime.package import load_package

    pkg = load_package(packages["pixart"])
    calib = record_calibration(pkg, read_prompt_file(prompts), steps=3)
    assert len(calib.feeds["transformer"]) == 2 * 3  # batch-2 package: one CFG call per step
    assert len({round(t, 3) for _, _, t in calib.transformer_meta}) == 3
    assert len(calib.feeds["text_encoder"]) == 4  # each prompt and the empty negative prompt
    assert len(calib.feeds["vae_decoder"]) == 2
    first, last = calib.feeds["transformer"][0], calib.feeds["transformer"][2]
    assert first["timestep"][0] > last["timestep"][0] and not np.allclose(first["sample"], last["sample"])
    assert set(first) == {s.name for s in pkg.input_specs("transformer")}


def test_unfuse_gemm_keeps_outputs(packages, tmp_path):
    from edit_mobile.export import quantize_onnx as qo

    src = packages["pixart"] / "transformer" / "model.onnx"
    model = qo.load_model(src)
    assert qo.unfuse_gemm(model) > 0 and not any(n.op_type == "Gemm" for n in model.graph.node)
    qo.save_model(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    feed = {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in model.graph.input
    }
    a, b = qo.run_feeds(src, [feed]), qo.run_feeds(tmp_path / "m.onnx", [feed])
    np.testing.assert_allclose(a[0][0], b[0][0], rtol=1e-4, atol=1e-4)


def test_fp16_safety_reports_non_finite_in_true_fp16():
    """A value beyond 65504 is finite in ONNX Runtime's CPU fp16 (computed in fp32), not in true fp16."""
    import torch

    from edit_mobile.export.components import ComponentSpec, TensorSpec
    from edit_mobile.export.fp16_safety import check_fp16

    linear = torch.nn.Linear(4, 4)
    torch.nn.init.constant_(linear.weight, 1000.0)
    spec = ComponentSpec(
        "transformer", linear, [TensorSpec("x", (1, 4), "float32")], [TensorSpec("y", (1, 4), "float32")]
    )
    feeds = [
        ({"step": 0}, {"x": np.full((1, 4), 1.0, np.float32)}),
        ({"step": 1}, {"x": np.full((1, 4), 100.0, np.float32)}),
    ]
    report = check_fp16({"transformer": spec}, ["transformer"], {"transformer": feeds})["transformer"]
    assert report["finite"] is False and report["checks"] == 2
    assert report["non_finite"] == [{"step": 1, "non_finite_values": {"y": 4}}]
    assert linear.weight.dtype == torch.float32  # the reference module is untouched


def test_validate_fails_an_fp16_package_on_non_finite(quantized, tiny_dirs, monkeypatch, capsys):
    import edit_mobile.export.fp16_safety as fp16_safety

    real = fp16_safety.check_fp16

    def overflowing(specs, components, inputs):
        report = real(specs, components, inputs)
        report["transformer"].update(finite=False, non_finite=[{"step": 1, "non_finite_values": {"out_sample": 3}}])
        return report

    monkeypatch.setattr(fp16_safety, "check_fp16", overflowing)
    pkg = quantized("pixart", "fp16")
    assert cli(["validate", str(pkg), "--reference", str(tiny_dirs[FAMILIES["pixart"]]), *VALIDATE]) == 1
    out = capsys.readouterr().out
    assert "fp16 safety (true fp16) transformer: 2 checks, NON-FINITE at {'step': 1}" in out and "FAILED" in out


def test_quantizing_a_quantized_component_is_refused(quantized, tmp_path, capsys):
    src = quantized("pixart", "int8-dynamic")
    assert (
        cli(
            [
                "quantize",
                str(src),
                "--precision",
                "fp16",
                "--components",
                "transformer",
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "transformer is already int8-dynamic; quantize the fp32 package instead" in err
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--precision", "int8-dynamic", "--calibration-prompts", "{tmp}/missing.txt"], "does not exist"),
        (["--precision", "int8-dynamic", "--calibration-prompts", "{empty}"], "is empty"),
        (["--precision", "int4"], "unknown precision 'int4'"),
        (["--precision", "transformer=int3"], "unknown precision 'int3' for transformer"),
        (["--precision", "fp16", "--components", "transformer,unet"], "unknown component 'unet'"),
        (["--precision", "int8-static", "--calibration-method", "kl"], "unknown --calibration-method 'kl'"),
        (["--precision", "int8-static", "--calibration-steps", "0"], "--calibration-steps must be >= 1"),
        (["--precision", "int8-dynamic", "--keep-8bit", "2"], "--keep-8bit K needs K >= 0 and an int4-weights"),
        (["--precision", "int4-weights", "--keep-8bit", "-1"], "--keep-8bit K needs K >= 0"),
        (["--precision", "int8-weights", "--full-range-weights"], "--full-range-weights applies to int8-dynamic"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(packages, tmp_path, tmp_path_factory, capsys, extra, message):
    empty = tmp_path_factory.mktemp("empty") / "empty.txt"
    empty.write_text("\n  \n")
    out_root = tmp_path / "out"
    out_root.mkdir()
    argv = [
        "quantize",
        str(packages["pixart"]),
        *[a.format(tmp=tmp_path, empty=empty) for a in extra],
        "--out",
        str(out_root / "q"),
    ]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert list(out_root.iterdir()) == []


def test_out_must_differ_from_the_input(packages, capsys):
    assert (
        cli(
            [
                "quantize",
                str(packages["pixart"]),
                "--precision",
                "fp16",
                "--out",
                str(packages["pixart"]),
                "--overwrite",
            ]
        )
        == 2
    )
    assert "--out must differ" in capsys.readouterr().err
    assert (packages["pixart"] / "manifest.json").is_file()


def _coreml_manifest(tmp_path):
    pkg = tmp_path / "coreml-pkg"
    pkg.mkdir()
    (pkg / "manifest.json").write_text(json.dumps({"schema_version": 1, "target": "coreml"}))
    return pkg


def test_coreml_package_is_dispatched_to_the_coreml_quantizer(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("edit_mobile.export.coreml_quantize")
    fake.quantize_coreml_package = lambda *args, **kwargs: calls.append((args, kwargs)) or {}
    monkeypatch.setitem(sys.modules, "edit_mobile.export.coreml_quantize", fake)
    pkg = _coreml_manifest(tmp_path)
    assert (
        cli(
            [
                "quantize",
                str(pkg),
                "--precision",
                "palettize-4",
                "--components",
                "transformer",
                "--calibration-steps",
                "3",
                "--out",
                str(tmp_path / "q"),
            ]
        )
        == 0
    )
    assert calls == [((str(pkg), str(tmp_path / "q"), "palettize-4", ["transformer"], False), {"calibration_steps": 3})]


def test_coreml_package_without_coreml_quantizer(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "edit_mobile.export.coreml_quantize", None)  # import fails
    pkg = _coreml_manifest(tmp_path)
    assert cli(["quantize", str(pkg), "--precision", "palettize-4", "--out", str(tmp_path / "q")]) == 2
    assert "Core ML quantization is not available in this build" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


# --- ONNX Runtime's quantizers leave process-wide logging state alone -------------------------------------------
def _small_graph(path):
    """MatMul + Add and a Conv with constant weights: what the int8 quantizers change."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Add", ["h", "B"], ["y"], name="add"),
            helper.make_node("Conv", ["img", "K"], ["z"], name="conv", pads=[1, 1, 1, 1]),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 8, 8]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 64]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, 8, 8]),
        ],
        [
            numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "B"),
            numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "K"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    rng = np.random.default_rng(1)
    return [
        {"x": rng.standard_normal((1, 8, 64)).astype(np.float32), "img": rng.random((1, 4, 8, 8), np.float32)}
        for _ in range(3)
    ]


def _logging_state() -> dict:
    import logging

    root = logging.getLogger()
    return {
        "root_level": root.level,
        "root_filters": list(root.filters),
        "handlers": list(root.handlers),
        "handler_filters": [list(h.filters) for h in root.handlers],
        "disable": logging.root.manager.disable,
        "ort_level": logging.getLogger("onnxruntime.quantization").level,
    }


@pytest.mark.parametrize("precision", ["int8-dynamic", "int8-static", "int8-weights"])
def test_quantizers_leave_logging_state_alone(tmp_path, monkeypatch, precision):
    """No root-logger filter, no logging.disable, the quantizers' own logger restored: after a quantization and
    after one that raises inside ONNX Runtime's quantizer."""
    import logging

    import onnxruntime.quantization as ortq

    from edit_mobile.export import quantize_onnx as qo

    feeds = _small_graph(tmp_path / "m.onnx")
    run = {
        "int8-dynamic": lambda dst: qo.quantize_dynamic_int8(tmp_path / "m.onnx", dst, qo.QuantOptions()),
        "int8-static": lambda dst: qo.quantize_static_int8(tmp_path / "m.onnx", dst, feeds, qo.QuantOptions()),
        "int8-weights": lambda dst: qo.quantize_weights(tmp_path / "m.onnx", dst, qo.QuantOptions()),
    }[precision]
    before = _logging_state()
    run(tmp_path / "q.onnx")
    assert _logging_state() == before
    assert (tmp_path / "q.onnx").is_file()

    seen = {}

    def failing(*args, **kwargs):  # inside the quantizer: the scoped settings are in force, then it raises
        seen["ort_level"] = logging.getLogger("onnxruntime.quantization").getEffectiveLevel()
        seen["disable"] = logging.root.manager.disable
        raise RuntimeError("planted failure")

    if precision == "int8-weights":
        nbits = qo._import_matmul_nbits_quantizer()
        monkeypatch.setattr(nbits.MatMulNBitsQuantizer, "process", failing)
    else:
        monkeypatch.setattr(ortq, "quantize_dynamic" if precision == "int8-dynamic" else "quantize_static", failing)
    with pytest.raises(RuntimeError, match="planted failure"):
        run(tmp_path / "q2.onnx")
    assert seen == {"ort_level": logging.WARNING, "disable": before["disable"]}
    assert _logging_state() == before


def test_quantize_output_has_no_ort_chatter(packages, prompts, tmp_path):
    """`edit-mobile quantize` in its own process (the CLI logs at INFO to stderr): no per-tensor notes and no
    pre-processing hint from ONNX Runtime's quantizers, and the log handlers are as before afterwards."""
    import subprocess

    runs = [
        ["quantize", str(packages["pixart"]), "--precision", p, "--out", str(tmp_path / p), "--components"]
        + ["transformer", "--calibration-prompts", str(prompts), *CALIB]
        for p in ("int8-dynamic", "int8-static")
    ]
    code = (
        "import logging, sys\n"
        "from edit_mobile.cli.main import main\n"
        f"for argv in {runs!r}:\n"
        "    assert main(argv) == 0\n"
        "    assert [h.filters for h in logging.getLogger().handlers] == [[]], logging.getLogger().handlers\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "INFO transformer -> int8-static" in proc.stderr  # the CLI's own INFO lines do show
    assert "Quantization parameters for tensor" not in proc.stderr and "pre-process" not in proc.stderr


def test_importing_the_weight_quantizer_leaves_the_root_logger_alone(tmp_path):
    """ONNX Runtime's matmul_nbits_quantizer calls logging.basicConfig(level=INFO) when imported; in a process with
    an unconfigured root logger, quantizing int8-weights must not leave that handler or level behind."""
    import subprocess

    _small_graph(tmp_path / "m.onnx")
    code = (
        "import logging, sys; from pathlib import Path\n"
        "from edit_mobile.export import quantize_onnx as qo\n"
        f"src = Path({str(tmp_path / 'm.onnx')!r})\n"
        "qo.quantize_weights(src, src.with_name('q.onnx'), qo.QuantOptions())\n"
        "root = logging.getLogger()\n"
        "assert root.handlers == [] and root.level == logging.WARNING, (root.handlers, root.level)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "complete quantization" not in proc.stderr and "start to quantize" not in proc.stderr


def test_onnx_quantizer_is_torch_free():
    """`edit-mobile quantize` of an ONNX package loads neither torch nor diffusers (7.5 s and ~0.5 GB when it did)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import edit_mobile.export.quantize, edit_mobile.cli.quantize\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
