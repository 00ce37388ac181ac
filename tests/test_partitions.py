"""`edit-mobile inspect --android` (export/partitions.py): ONNX Runtime's partitioning estimate per graph and
execution provider, and the export twin it led to (an unpatchify of rank <= 5 without Einsum, so the transformer
is one Core ML partition)."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from edit_mobile.cli.main import main as cli
from edit_mobile.export.components import ComponentSpec, TensorSpec
from edit_mobile.export.onnx_export import export_onnx
from edit_mobile.export.partitions import PROVIDERS, node_flops, partition_graph
from edit_mobile.models.families import PixArtTransformer
from edit_mobile.runtime.package import load_package


@pytest.fixture(scope="module")
def package(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("android") / "pkg"
    src = str(tiny_dirs["tiny-pixart-edit-trained"])
    assert cli(["export", src, "--resolution", "128", "--graph", "plain", "--out", str(out)]) == 0
    return out


def test_fused_operators_leave_the_mobile_providers(tiny_dirs, tmp_path):
    """The default fused graph's ONNX Runtime operators have no Core ML / NNAPI kernel: the report shows them on the
    CPU and the Core ML partition split (why docs/export.md sends those providers' users to --graph plain)."""
    out = tmp_path / "pkg"
    assert cli(["export", str(tiny_dirs["tiny-pixart-edit-trained"]), "--resolution", "128", "--out", str(out)]) == 0
    coreml = partition_graph(onnx.load(str(out / "transformer" / "model.onnx")), "CoreML")
    assert {"MultiHeadAttention", "FastGelu", "SkipLayerNormalization"} <= set(coreml["cpu_ops"])
    assert coreml["partitions"] > 1


def test_report_per_graph_and_provider(package, tmp_path, capsys):
    report_path = tmp_path / "partitions.json"
    assert cli(["inspect", str(package), "--android", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert set(report) == {"text_encoder", "transformer", "vae_decoder", "vae_encoder"}
    for by_provider in report.values():
        assert set(by_provider) == set(PROVIDERS)
        for r in by_provider.values():
            assert 0 <= r["supported_nodes"] <= r["nodes"] and r["partitions"] >= (r["supported_nodes"] > 0)
            assert r["nodes"] - r["supported_nodes"] == sum(r["cpu_ops"].values())
    transformer = report["transformer"]
    # EDiT's own ops (ReLU linear attention, ConvFusion's depthwise conv, the compressors) and the whole graph:
    # one Core ML partition, every attention node and every FLOP in it.
    coreml = transformer["CoreML"]
    assert coreml["partitions"] == 1 and coreml["cpu_ops"] == {} and coreml["flop_fraction"] == 1.0
    assert coreml["attention_supported"] == coreml["attention_nodes"] > 0
    # NNAPI has no LayerNormalization: each one leaves the accelerator (what the report is for)
    assert transformer["NNAPI"]["cpu_ops"].get("LayerNormalization", 0) > 0 and transformer["NNAPI"]["partitions"] > 1
    out = capsys.readouterr().out
    assert "transformer" in out and "CoreML" in out and "XNNPACK" in out


def test_diffusers_unpatchify_left_the_core_ml_partition(tiny_dirs, tmp_path):
    """Before the export twin: the diffusers forward traced as it is (rank-6 reshape + Einsum) ends the Core ML
    partition early; the same weights exported by `export` do not (test above)."""
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(tiny_dirs["tiny-pixart-edit-trained"])
    t = pipe.transformer
    d = pipe.text_encoder.config.d_model
    spec = ComponentSpec(
        "transformer",
        PixArtTransformer(t).eval(),
        [
            TensorSpec("sample", (2, 4, 16, 16), "float32"),
            TensorSpec("timestep", (2,), "float32"),
            TensorSpec("encoder_hidden_states", (2, 8, d), "float32"),
            TensorSpec("encoder_attention_mask", (2, 8), "int64"),
        ],
        [TensorSpec("out_sample", (2, t.config.out_channels, 16, 16), "float32")],
    )
    model = onnx.shape_inference.infer_shapes(onnx.load(str(export_onnx(spec, tmp_path / "ref"))))
    coreml = partition_graph(model, "CoreML")
    assert "Einsum" in coreml["cpu_ops"] and coreml["supported_nodes"] < coreml["nodes"]


def test_flops_of_matmul_and_conv():
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["a", "w"], ["y"], name="/blocks.0/attn1/MatMul"),
            helper.make_node("Conv", ["x", "k"], ["z"], name="/conv", group=4),
            helper.make_node("Relu", ["y"], ["r"], name="/relu"),
        ],
        "g",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 5, 8]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
        ],
        [
            helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 5, 3]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4, 6, 6]),
        ],
        [
            helper.make_tensor("w", TensorProto.FLOAT, [8, 3], [0.0] * 24),
            helper.make_tensor("k", TensorProto.FLOAT, [4, 1, 3, 3], [0.0] * 36),
        ],
        value_info=[helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 3])],
    )
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
    shapes.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.value_info})
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    matmul, conv, relu = graph.node
    assert node_flops(matmul, shapes) == 2 * (2 * 5 * 3) * 8  # every output element: 8 multiply-adds
    assert node_flops(conv, shapes) == 2 * (4 * 6 * 6) * (1 * 3 * 3)  # depthwise: C_in / groups = 1
    assert node_flops(relu, shapes) == 0
    r = partition_graph(helper.make_model(graph), "NNAPI")
    assert r["flop_fraction"] == 1.0 and r["attention_nodes"] == 1 and r["partitions"] == 1
    # XNNPACK's MatMul takes rank <= 2 only: a (B, N, D) x (D, D') Linear stays on the CPU, the conv does not
    r = partition_graph(helper.make_model(graph), "XNNPACK")
    assert r["cpu_ops"] == {"MatMul": 1, "Relu": 1} and r["supported_nodes"] == 1


def test_a_core_ml_package_is_refused_in_one_line(package, tmp_path, capsys):
    manifest = json.loads((package / "manifest.json").read_text())
    assert load_package(package).target == "onnx"
    fake = tmp_path / "pkg"
    fake.mkdir()
    manifest["target"] = "coreml"
    (fake / "manifest.json").write_text(json.dumps(manifest))
    assert cli(["inspect", str(fake), "--android"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
