"""`edit-mobile inspect PKG --android`: how each graph of an ONNX package partitions between a phone's accelerator
execution providers and the CPU.

An op an execution provider does not take falls back to ONNX Runtime's CPU kernels, silently, and every switch
between the accelerator and the CPU splits the graph into one more partition (with a copy at each boundary). ONNX
Runtime ships the analysis (onnxruntime/tools/mobile_helpers/usability_checker.py: the partitioning an EP would
get, from its supported-op table and the graph's static shapes); this module runs it per component and per
provider and adds what the checker does not say: the share of the graph's FLOPs (MatMul, Gemm, Conv) and of the
attention layers' nodes inside the supported partitions.

Providers: NNAPI and Core ML (ML program) with the tables ONNX Runtime ships, XNNPACK with
export/assets/xnnpack_supported_ops.md (ONNX Runtime does not ship one: written from its XNNPACK provider's kernel
registrations and node checks, the source and version named in the file).
"""

from __future__ import annotations

import collections
from importlib import resources
from pathlib import Path

import onnx
from onnx import helper

# provider -> (package holding its supported-op table, file name, tensor rank limit of the provider)
PROVIDERS = {
    "NNAPI": ("onnxruntime.tools.mobile_helpers", "nnapi_supported_ops.md", 999),
    "XNNPACK": ("edit_mobile.export", "assets/xnnpack_supported_ops.md", 999),
    "CoreML": ("onnxruntime.tools.mobile_helpers", "coreml_supported_mlprogram_ops.md", 5),
}


def _table(provider: str) -> Path:
    package, name, _ = PROVIDERS[provider]
    return Path(str(resources.files(package).joinpath(name)))


def _shapes(graph: onnx.GraphProto) -> dict[str, list[int]]:
    out = {}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        out[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    for t in graph.initializer:
        out[t.name] = list(t.dims)
    return out


def node_flops(node: onnx.NodeProto, shapes: dict[str, list[int]]) -> int:
    """Multiply-adds x 2 of the ops that carry a transformer's compute (MatMul and its quantized / weight-only
    forms, Gemm, Conv); 0 for the rest (element-wise ops are memory-bound, not FLOP-bound)."""
    out = shapes.get(node.output[0]) if node.output else None
    if not out:
        return 0
    elements = 1
    for d in out:
        elements *= d
    op = node.op_type
    if op in ("MatMul", "MatMulInteger", "MatMulNBits", "QLinearMatMul", "Gemm"):
        a = shapes.get(node.input[0])
        if not a:
            return 0
        transposed = op == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute)
        return 2 * elements * (a[-2] if transposed else a[-1])
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w = shapes.get(node.input[3 if op == "QLinearConv" else 1])
        if not w:
            return 0
        per_output = 1
        for d in w[1:]:  # (C_out, C_in / groups, kh, kw)
            per_output *= d
        return 2 * elements * per_output
    return 0


class XnnpackChecker:
    """XNNPACK's node checks beyond the op type (export/assets/xnnpack_supported_ops.md): its MatMul and Gemm take
    rank <= 2 inputs with a constant B only (a transformer's (B, N, D) x (D, D') Linear is not taken), Conv a
    constant weight, Softmax the last axis, Resize the linear mode."""

    def __init__(self, graph: onnx.GraphProto, shapes: dict[str, list[int]]):
        from onnxruntime.tools.mobile_helpers.usability_checker import _SupportedOpsChecker

        self.table = _SupportedOpsChecker(_table("XNNPACK"))
        self.constant, self.shapes = {t.name for t in graph.initializer}, shapes

    def get_caveats(self) -> list[str]:
        return self.table.get_caveats()

    def is_op_supported(self, node: onnx.NodeProto) -> bool:
        if not self.table.is_op_supported(node):
            return False
        ranks = [len(self.shapes.get(name, [])) for name in node.input if name]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        op = node.op_type
        if op == "MatMul":
            return all(1 <= r <= 2 for r in ranks) and node.input[1] in self.constant
        if op == "Gemm":
            ones = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
            return ones and all(r <= 2 for r in ranks) and all(n in self.constant for n in node.input[1:])
        if op in ("Conv", "ConvTranspose"):
            return ranks[0] in (3, 4) and all(n in self.constant for n in node.input[1:])
        if op in ("MaxPool", "AveragePool"):
            return ranks[0] == 4
        if op == "Softmax":
            return attrs.get("axis", -1) in (-1, ranks[0] - 1)
        if op == "Resize":
            return attrs.get("mode", b"nearest") == b"linear"
        return True


def _is_attention(node: onnx.NodeProto) -> bool:
    """A node of an attention layer: the exporter names nodes by module path (".../attn1/...", ".../attn/...")."""
    return any(part.startswith("attn") for part in node.name.split("/"))


def partition_graph(model: onnx.ModelProto, provider: str) -> dict:
    """ONNX Runtime's partitioning estimate for one provider, with FLOP and attention-node shares."""
    from onnxruntime.tools.mobile_helpers.usability_checker import _SupportedOpsChecker, check_partitioning

    _, _, max_rank = PROVIDERS[provider]
    shapes = _shapes(model.graph)
    if provider == "XNNPACK":
        checker = XnnpackChecker(model.graph, shapes)
    else:
        checker = _SupportedOpsChecker(_table(provider))
    info = check_partitioning(model.graph, checker, require_fixed_input_sizes=True, max_rank=max_rank)
    taken = {id(n) for group in info.supported_groups for n in group}
    nodes = list(model.graph.node)
    flops = {id(n): node_flops(n, shapes) for n in nodes}
    attention = [n for n in nodes if _is_attention(n)]
    on_cpu = collections.Counter(n.op_type for n in nodes if id(n) not in taken)
    total_flops = sum(flops.values())
    return {
        "nodes": len(nodes),
        "supported_nodes": len(taken),
        "partitions": info.num_partitions,
        "node_fraction": round(len(taken) / max(len(nodes), 1), 4),
        "flop_fraction": round(sum(flops.get(k, 0) for k in taken) / total_flops, 4) if total_flops else None,
        "attention_nodes": len(attention),
        "attention_supported": sum(id(n) in taken for n in attention),
        "cpu_ops": dict(on_cpu.most_common()),
        "caveats": sorted(checker.get_caveats()),
        "verdict": info.suitability().name,  # ONNX Runtime's own YES / MAYBE / NO for trying this provider
    }


def _graph_only(path: Path) -> onnx.ModelProto:
    """The graph with its shapes, without the weights' bytes (a 1.5 GB T5-XXL chunk keeps them inline): the
    analysis needs op types, names and shapes only."""
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        t.ClearField("raw_data")
        t.ClearField("external_data")
        t.data_location = onnx.TensorProto.DEFAULT
    if not model.graph.value_info:  # exported graphs carry their inferred shapes; a quantized one may not
        model = onnx.shape_inference.infer_shapes(model)
    return model


def android_report(package_dir: str | Path, providers=tuple(PROVIDERS)) -> dict:
    """{component (or component/chunk-NN): {provider: partition_graph(...)}} for every ONNX graph of a package."""
    from ..runtime.errors import UserError
    from ..runtime.package import load_package

    package = load_package(package_dir)
    if package.target not in ("onnx", "ort-mobile"):
        raise UserError(f"--android analyses ONNX packages; {package_dir} is a {package.target} package")
    report = {}
    for name, comp in package.components.items():
        for path in comp.chunk_paths or (comp.path,):
            model = _graph_only(path)
            key = f"{name}/{path.parent.name}" if comp.chunk_paths else name
            report[key] = {p: partition_graph(model, p) for p in providers}
    return report


def format_android_report(report: dict) -> str:
    lines = [f"{'graph':<28} {'provider':<8} {'nodes':>12} {'FLOPs':>6} {'attn':>9} {'parts':>5}  on the CPU"]
    for graph, by_provider in report.items():
        for provider, r in by_provider.items():
            flops = "-" if r["flop_fraction"] is None else f"{100 * r['flop_fraction']:.0f}%"
            cpu = ", ".join(f"{op} x{n}" for op, n in list(r["cpu_ops"].items())[:6]) or "-"
            lines.append(
                f"{graph:<28} {provider:<8} {r['supported_nodes']:>5}/{r['nodes']:<6} {flops:>6} "
                f"{r['attention_supported']:>4}/{r['attention_nodes']:<4} {r['partitions']:>5}  {cpu}"
            )
    return "\n".join(lines)
