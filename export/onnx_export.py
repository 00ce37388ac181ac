"""ONNX export of one component: model + spec -> model.onnx (+ model.onnx.data), checked and shape-inferred."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from .components import ComponentSpec
from .mha import fused_attention, optimize_transformer
from .onnx_files import EXTERNAL_DATA_THRESHOLD, external_data_file, save_onnx

logger = logging.getLogger(__name__)

# Opset 17: the first with LayerNormalization as one op (every transformer block uses it), supported by every
# ONNX Runtime >= 1.14 including the mobile builds and by the Core ML / NNAPI execution providers' op lists.
# The TorchScript exporter (dynamo=False) is used because it exports diffusers' PixArt and SD3 transformers with
# error <= 1e-6, whereas the dynamo exporter's PixArt graph fails to load in ONNX Runtime.
OPSET = 17


def export_onnx(spec: ComponentSpec, out_dir: Path, seed: int = 0, stem: str = "model", fused: bool = False) -> Path:
    """Trace `spec.module` with static example inputs and write `out_dir/<stem>.onnx` (a graph over 2 GB keeps its
    weights in `<stem>.onnx.data`); returns the path. `fused`: its softmax attention as ONNX Runtime's fused
    MultiHeadAttention and the graph through ONNX Runtime's transformer optimizer (export/mha.py)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    example = tuple(s.example(gen) for s in spec.inputs)
    module = spec.module.eval()
    path = out_dir / f"{stem}.onnx"
    # no_grad, not inference_mode: under inference_mode the exporter turns some parameter views into graph inputs.
    fusing = fused_attention(module) if fused else contextlib.nullcontext()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp, torch.no_grad(), warnings.catch_warnings(), fusing:
        # Tracing warns about Python ints taken from shapes: intended, every shape is static.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        # PixArt's final squeeze(1) is a no-op at our static shapes; the exporter drops it and says so.
        warnings.filterwarnings("ignore", message="This model contains a squeeze operation")
        opsets = {"com.microsoft": 1} if fused else None
        model = trace_onnx(module, example, spec, Path(tmp) / "model.onnx", custom_opsets=opsets)
        large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
        gathered = Path(tmp) / "gathered" / path.name
        gathered.parent.mkdir()
        save_onnx(model, gathered, large)
        del model
        folded = Path(tmp) / "folded" / path.name if fused else path  # the optimizer then writes `path`
        folded.parent.mkdir(exist_ok=True)
        fold_static_shapes(gathered, folded, large, spec)
        if fused:
            optimize_transformer(folded, path)
    check_onnx(path, spec)
    logger.info("exported %s: %.1f MB", spec.name, sum(f.stat().st_size for f in out_dir.iterdir()) / 1e6)
    return path


def trace_onnx(module, example: tuple, spec: ComponentSpec, path: Path, custom_opsets=None) -> onnx.ModelProto:
    """The TorchScript exporter at OPSET with constant folding, to `path`; returns the model loaded back (with any
    external data the exporter scattered beside it) and its Identity(initializer) aliases inlined."""
    torch.onnx.export(
        module,
        example,
        str(path),
        input_names=[s.name for s in spec.inputs],
        output_names=[s.name for s in spec.outputs],
        opset_version=OPSET,
        dynamo=False,
        do_constant_folding=True,
        custom_opsets=custom_opsets,
    )
    model = onnx.load(str(path))
    inline_initializer_identities(model)
    return model


def inline_initializer_identities(model: onnx.ModelProto) -> None:
    """Replace `Identity(initializer)` nodes by the initializer itself.

    The exporter deduplicates equal constants (a freshly converted EDiT has identical GroupNorm weights in every
    layer) into Identity nodes, and ONNX Runtime's graph optimizer then drops such an Identity while a later node
    still reads its output ("Node input ... is not a graph input, initializer, or output of a previous node").
    """
    initializers = {t.name for t in model.graph.initializer}
    alias = {
        n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Identity" and n.input[0] in initializers
    }
    outputs = {o.name for o in model.graph.output}
    alias = {k: v for k, v in alias.items() if k not in outputs}
    keep = [n for n in model.graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del model.graph.node[:]
    model.graph.node.extend(keep)


def fold_static_shapes(src: Path, dst: Path, large: bool, spec: ComponentSpec) -> None:
    """Constant-fold the traced shape arithmetic with ONNX Runtime's basic (ONNX-standard) graph optimizations.

    The TorchScript exporter records shape computations (GroupNorm's reshape, F.pad's pad amounts) as Shape ->
    Gather -> Concat chains, which leaves intermediate shapes unknown and makes it emit an `If` around PixArt's
    final squeeze. With every input shape static, ONNX Runtime folds them all: a fully static graph of standard
    ops, which mobile execution providers (Core ML, NNAPI) need. Only the basic level is used: it does not emit
    ONNX Runtime's contrib ops, so the graph stays portable.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    if large:
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", external_data_file(dst)
        )
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(dst), load_external_data=False)
    # ONNX Runtime declares its own domains (ai.onnx.ml, training) even when no node uses them.
    used = {n.domain for n in model.graph.node} | {""}
    keep = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    stamp_output_shapes(model, spec)
    onnx.save_model(model, str(dst))  # external data (if any) stays in place: only the graph proto is rewritten
    # Shape inference must now resolve every value statically; the path form works with external data too.
    onnx.shape_inference.infer_shapes_path(str(dst), str(dst), strict_mode=True, data_prop=True)


def stamp_output_shapes(model: onnx.ModelProto, spec: ComponentSpec) -> None:
    """Write the spec's static output shapes into the graph signature.

    The exporter leaves output dims unnamed where a shape passes through ops such as Slice, which ONNX shape
    inference cannot always resolve; onnx_parity then checks that ONNX Runtime really produces these shapes.
    """
    for value, s in zip(model.graph.output, spec.outputs):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for n in s.shape:
            dims.add().dim_value = n


def check_onnx(path: Path, spec: ComponentSpec) -> None:
    """Full onnx.checker pass, shape inference, and the static I/O signature the spec promises."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    for values, specs in ((model.graph.input, spec.inputs), (model.graph.output, spec.outputs)):
        got = {
            v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in values
        }
        for s in specs:
            if got.get(s.name) != list(s.shape):
                raise RuntimeError(f"{spec.name}: {s.name} exported with shape {got.get(s.name)}, spec {s.shape}")


def onnx_parity(spec: ComponentSpec, path: Path, seed: int = 1) -> dict:
    """Run the exported graph in ONNX Runtime and the module in PyTorch on the same random inputs."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(seed)
    example = [s.example(gen) for s in spec.inputs]
    with torch.inference_mode():
        ref = spec.module(*example)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([s.name for s in spec.outputs], {s.name: t.numpy() for s, t in zip(spec.inputs, example)})
    for s, g in zip(spec.outputs, got):
        if g.shape != s.shape:
            raise RuntimeError(f"{spec.name}: ONNX Runtime returned {s.name} of shape {g.shape}, spec {s.shape}")
    return {s.name: float(np.abs(g - r.numpy()).max()) for s, g, r in zip(spec.outputs, got, ref)}
