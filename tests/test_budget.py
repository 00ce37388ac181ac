"""The memory budget (export/budget.py): static liveness of a graph's tensors, the per-phase prediction, and the
`inspect --budget-mb` / `export --budget-mb` gates."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edit_mobile.cli.main import main as cli
from edit_mobile.export.budget import graph_memory

MIB = 2**20


def _graph(tmp_path):
    """x (1 MiB) -> MatMul W (4 MiB weights) -> h -> Relu -> r -> Reshape -> s -> Add x -> y, x alive throughout."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 1024])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 1024])
    w = numpy_helper.from_array(np.ones((1024, 1024), np.float32), "w")
    shape = numpy_helper.from_array(np.array([256, 1024], np.int64), "shape")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["s"]),
        helper.make_node("Add", ["s", "x"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [x], [y], [w, shape])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.save_model(model, tmp_path / "g.onnx")
    return tmp_path / "g.onnx"


def test_liveness_counts_buffers_as_the_planner_shares_them(tmp_path):
    memory = graph_memory(_graph(tmp_path))
    assert memory["weights"] == memory["inline"] == 4 * MIB + 16
    # x and h (1 MiB each) at the MatMul; Relu writes into h, Reshape's s is that buffer, Add writes into it:
    # two tensors at most (three if a rule were missing).
    assert memory["activations"] == 2 * MIB


def test_dequantized_constants_count_as_the_session_holds_them(tmp_path):
    """An int8 weight behind a constant DequantizeLinear: 1 byte per element on disk, 4 once a session with QDQ
    handling off folds it into an fp32 initializer (the int8 Conv weights `quantize` writes)."""
    q = numpy_helper.from_array(np.ones((1024, 1024), np.int8), "q")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 1024])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 1024])
    nodes = [helper.make_node("DequantizeLinear", ["q", "scale"], ["w"]), helper.make_node("MatMul", ["x", "w"], ["y"])]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], [q, scale]), opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.save_model(onnx.shape_inference.infer_shapes(model), tmp_path / "dq.onnx")
    assert graph_memory(tmp_path / "dq.onnx")["weights"] == MIB + 4
    assert graph_memory(tmp_path / "dq.onnx", folds_dequantize=True)["weights"] == 4 * MIB + 4


def test_inspect_and_export_budgets(tmp_path, capsys):
    pkg = tmp_path / "pkg"
    assert cli(["export", "tiny-pixart", "--resolution", "128", "--out", str(pkg)]) == 0
    capsys.readouterr()
    report = tmp_path / "budget.json"
    assert cli(["inspect", str(pkg), "--budget-mb", "100000", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "--memory low: fits in 100000 MB" in out
    prediction = json.loads(report.read_text())
    for mode in ("default", "low"):
        peaks = prediction[mode]
        assert all(peaks[p] > prediction["baseline_mb"] for p in ("text_encoding", "denoising", "decoding"))
    assert max(prediction["low"].values()) <= max(prediction["default"].values())  # one component at a time
    assert cli(["inspect", str(pkg), "--budget-mb", "1"]) == 1
    assert "--memory low: does NOT fit in 1 MB" in capsys.readouterr().out
    # export refuses a package that cannot fit, in one line, and writes nothing
    assert cli(["export", "tiny-pixart", "--resolution", "128", "--budget-mb", "1", "--out", str(tmp_path / "p2")]) == 2
    err = capsys.readouterr().err.strip()  # after the export's progress bars: one error line
    assert "exceeds --budget-mb 1; largest component:" in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "p2").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["budget.json", "pkg"]
