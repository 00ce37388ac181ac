"""`edit-mobile inspect`: what is inside each exported graph, and what would stop it on a device (ONNX graphs: their
operators against the mobile execution providers' lists; ExecuTorch programs: what the delegate took)."""

from __future__ import annotations

import collections
import re
from importlib import resources
from pathlib import Path

import onnx

from ..runtime.errors import UserError
from ..runtime.package import load_package

# Execution providers whose supported-op lists ship with ONNX Runtime (onnxruntime/tools/mobile_helpers):
# an op outside a list runs on the CPU instead of the accelerator (a partitioned, slower graph).
EP_OP_LISTS = {"coreml": "coreml_supported_mlprogram_ops.md", "nnapi": "nnapi_supported_ops.md"}


def supported_ops(ep: str) -> set[str]:
    text = resources.files("onnxruntime.tools.mobile_helpers").joinpath(EP_OP_LISTS[ep]).read_text()
    return {m.group(1) for m in re.finditer(r"^\|ai\.onnx:(\w+)\|", text, flags=re.M)}


def _dims(value) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]


def inspect_model(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    ops = collections.Counter((f"{n.domain}:" if n.domain else "") + n.op_type for n in graph.node)
    params = sum(int(_prod(t.dims)) for t in graph.initializer)
    dynamic = [
        f"{v.name}{_dims(v)}"
        for v in [*graph.input, *graph.output]
        if any(not isinstance(d, int) or d <= 0 for d in _dims(v))
    ]
    unknown_inner = sum(1 for v in graph.value_info if any(not isinstance(d, int) or d <= 0 for d in _dims(v)))
    fp64 = [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.DOUBLE]
    fp64 += [v.name for v in graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE]
    files = [path, *[path.parent / e.value for t in graph.initializer for e in t.external_data if e.key == "location"]]
    size = sum(f.stat().st_size for f in dict.fromkeys(files))
    return {
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "parameters": params,
        "size_mb": round(size / 1e6, 3),
        "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "dynamic_io_dims": dynamic,
        "intermediate_values_with_unknown_shape": unknown_inner,
        "fp64_tensors": fp64,
        "ops_outside": {ep: sorted(op for op in ops if op not in supported_ops(ep)) for ep in EP_OP_LISTS},
    }


def _prod(dims) -> int:
    out = 1
    for d in dims:
        out *= d
    return out


def inspect_package(package: str | Path) -> dict:
    pkg = load_package(package)
    if pkg.target == "coreml":
        raise UserError(
            f"{package} is a Core ML package: inspect reads ONNX graphs (Core ML programs are checked by "
            "`edit-mobile validate` through the reference executor)"
        )
    if pkg.target == "executorch":
        return {name: inspect_program(pkg, name) for name in pkg.components}
    report = {}
    for name, comp in pkg.components.items():
        for path in comp.chunk_paths or (comp.path,):  # a chunked component: one entry per chunk
            onnx_path = path.with_suffix(".onnx")  # .ort packages keep their source .onnx beside the .ort file
            if not onnx_path.is_file():
                raise UserError(f"{name}: {onnx_path} is missing")
            key = f"{name}/{path.parent.name}" if comp.chunk_paths else name
            report[key] = {"precision": comp.precision, **inspect_model(onnx_path)}
    return report


def inspect_program(pkg, name: str) -> dict:
    """An ExecuTorch component: what its delegate took, as measured on the lowered program at export
    (export/executorch_export.py: `delegation`), and the program's size."""
    comp = pkg.components[name]
    record = pkg.manifest.export.get(name, {})
    if "delegation" not in record:
        raise UserError(f"{name}: the manifest has no delegation record (export it again with --target executorch)")
    return {
        "precision": comp.precision,
        "size_mb": round(comp.path.stat().st_size / 1e6, 3),
        "delegate": record["delegate"],
        "delegation": record["delegation"],
    }


def format_report(report: dict) -> str:
    lines = []
    for name, r in report.items():
        if "delegation" in r:  # an ExecuTorch program
            d = r["delegation"]
            portable = ", ".join(
                f"{op.removeprefix('aten.').removesuffix('.default')}×{n}" for op, n in d["portable_ops"].items()
            )
            lines.append(f"{name}: {r['size_mb']:.1f} MB, {r['precision']}, {d['gflops']:.3f} GFLOP per call")
            lines.append(
                f"  delegated to {r['delegate']}: {d['delegated_op_fraction']:.1%} of the operators, "
                f"{d['delegated_flop_fraction']:.2%} of the FLOPs"
            )
            lines.append(f"  left to the portable CPU kernels: {portable or 'none'}")
            if "int8_convolutions" in d:
                lines.append(f"  dense convolutions stored int8: {d['int8_convolutions']}")
            if "coreml_reference_vs_torch" in d:  # checked at export: no Core ML backend in ExecuTorch off Apple
                check = d["coreml_reference_vs_torch"]
                worst = min(c["psnr_db"] for c in check["outputs"].values())
                lines.append(
                    f"  {check['partitions']} Core ML program(s), checked at export by the reference executor: "
                    f"{worst:.1f} dB vs PyTorch (gate {check['gate_db']:.0f} dB)"
                )
            continue
        top = ", ".join(f"{op}×{n}" for op, n in list(r["ops"].items())[:8])
        lines.append(
            f"{name}: {r['parameters'] / 1e6:.2f} M params, {r['size_mb']:.1f} MB, {r['precision']}, opset {r['opset']}"
        )
        lines.append(f"  ops ({sum(r['ops'].values())}): {top}{' ...' if len(r['ops']) > 8 else ''}")
        lines.append(
            f"  dynamic I/O dims: {r['dynamic_io_dims'] or 'none'}; fp64 tensors: "
            f"{len(r['fp64_tensors']) or 'none'}; values of unknown shape: "
            f"{r['intermediate_values_with_unknown_shape']}"
        )
        for ep, ops in r["ops_outside"].items():
            lines.append(f"  outside the {ep} execution provider's op list: {', '.join(ops) or 'none'}")
    return "\n".join(lines)
