"""ExecuTorch export of one component: `torch.export` -> Edge dialect, lowered to a delegate -> a `.pte` program.

ExecuTorch is what more and more phones run PyTorch models with: its XNNPACK delegate is the CPU path on Android and
iOS, and unlike Core ML it runs on Linux, so the kernels a phone uses check the export here (`executorch.runtime`).

The program is traced with the component's static example inputs (shapes are fixed, as in every target), lowered
with `to_edge_transform_and_lower` and the delegate's partitioner (default XNNPACK; "portable" keeps every operator
on ExecuTorch's portable CPU kernels, the reference the delegate is compared with), and serialised with
`to_executorch()`. One rewrite is needed first: ConvFusion's GroupNorm statistics use `aten.var_mean`, which is not
in the core ATen opset ExecuTorch's verifier accepts; it becomes `var` + `mean` (both core ATen, same arithmetic).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..runtime.errors import UserError
from ..runtime.manifest import EXECUTORCH_PRECISIONS
from .components import ComponentSpec
from .coreml_export import import_coremltools, quiet_coremltools
from .executorch_twin import xnnpack_twin

logger = logging.getLogger(__name__)

# xnnpack: the CPU path of Android and iOS; coreml: Apple's delegate (Core ML programs inside the .pte, run on Apple
# devices only: checked here by the Core ML reference executor); portable: no delegate, ExecuTorch's portable kernels
DELEGATES = ("xnnpack", "coreml", "portable")
INT4_BLOCK = 32  # input channels per int4 weight scale, as the ONNX int4-weights
# The components a precision applies to by default, as `edit-mobile quantize` does for ONNX: 4-bit text encoders
# of the tiny presets fall under the int4 gate (docs/quantization.md), so int4 takes the transformer only.
DEFAULT_COMPONENTS = {"int8-dynamic": ("transformer", "text_encoder"), "int4-weights": ("transformer",)}


def import_executorch():
    """The executorch package, or a one-line UserError naming the extra that installs it."""
    try:
        import executorch
        import executorch.exir  # noqa: F401  (the exporter; a broken install fails here, not mid-export)
    except ImportError as e:
        raise UserError(f"--target executorch needs ExecuTorch: pip install -e '.[executorch]' ({e})") from None
    return executorch


def check_delegate(delegate: str) -> None:
    if delegate not in DELEGATES:
        raise UserError(f"unknown --delegate {delegate!r}; expected one of {', '.join(DELEGATES)}")


def check_precision(precision: str | None) -> None:
    if precision is not None and precision not in EXECUTORCH_PRECISIONS:
        raise UserError(
            f"unknown ExecuTorch --precision {precision!r}; expected one of {', '.join(EXECUTORCH_PRECISIONS)}"
        )


def component_precision(name: str, precision: str | None) -> str:
    """The precision component `name` is exported in for the package-wide `--precision` (None: fp32)."""
    if precision is None or not any(name.startswith(c) for c in DEFAULT_COMPONENTS[precision]):
        return "fp32"
    return precision


def quantized_module(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    """`module` itself for fp32, else a quantized copy in the form ExecuTorch's XNNPACK delegate runs (torchao's
    `quantize_`, as ExecuTorch documents it): int8 activations quantized at run time per token, and int8 weights
    with one scale per output channel (int8-dynamic) or int4 weights with a scale per block of INT4_BLOCK input
    channels (int4-weights, XNNPACK's "8da4w"). Linear layers only: `quantized_convolutions` takes the convolutions
    on the traced program."""
    if precision == "fp32":
        return module
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, quantize_
    from torchao.quantization.granularity import PerAxis, PerGroup

    config = (
        Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
        if precision == "int8-dynamic"
        else Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(INT4_BLOCK))
    )
    quantized = copy.deepcopy(module).eval()
    quantize_(quantized, config)
    return quantized


def _is_dense_conv(node) -> bool:
    return node.op == "call_function" and node.target == torch.ops.aten.conv2d.default


def quantized_convolutions(program, example: tuple[torch.Tensor, ...]):
    """The traced `program` with its dense 2-D convolutions quantized as XNNPACK runs them (PT2E with the
    XNNPACKQuantizer): int8 weights with one scale per output channel, activations quantized to int8 at run time
    (XNNPACK's QD8 convolution), as torchao does the linear layers. ConvFusion's convolutions are most of an EDiT
    transformer's non-linear weights (334 MB of PixArt-Σ-XL's 2.65 GB), so without this a .pte keeps them fp32.
    Depthwise convolutions (the K/V compressors) stay fp32: XNNPACK has no dynamically quantized depthwise kernel.
    Returns the re-traced program and how many convolutions were quantized."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if not any(_is_dense_conv(n) for n in program.graph.nodes):  # nothing to do (and PT2E's rewrites break T5)
        return program, 0
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    # the convolutions only (their weight and bias nodes pass too): torchao has quantized the linear layers already
    quantizer.set_filter_function(lambda n: n.op != "call_function" or _is_dense_conv(n))
    prepared = prepare_pt2e(program.module(), quantizer)
    prepared(*example)  # dynamic quantization: no calibration, but the observers need one call to be placed
    converted = convert_pt2e(prepared)
    count = sum(
        _is_dense_conv(n) and "dequantize_per_channel" in str(n.args[1].target)
        for n in converted.graph.nodes
        if n.op == "call_function"
    )
    return torch.export.export(converted, example), count


def _decompositions() -> dict:
    """ATen ops our models emit that are outside the core ATen opset ExecuTorch verifies, rewritten into core ones
    (everything else stays as exported, so the delegate sees linear / conv / sdpa whole)."""
    aten = torch.ops.aten

    def var_mean(x, dim=None, *, correction=None, keepdim=False):
        return aten.var.correction(x, dim, correction=correction, keepdim=keepdim), aten.mean.dim(x, dim, keepdim)

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
        # torch's own decomposition guards the softmax against rows whose mask is all -inf (`_safe_softmax`: ==,
        # not, any, where and a zero tensor over the whole score matrix) and scales q and k each by sqrt(scale):
        # none of it XNNPACK takes, so 1.8 % of the tiny MM-EDiT's FLOPs ran on the portable kernels. Our masks are
        # additive and finite (PixArt -10 000, transformers' finfo.min), so no row is all -inf and the plain
        # softmax is the same function; the export's parity check compares the program with PyTorch.
        if dropout_p or is_causal or enable_gqa:
            return aten.scaled_dot_product_attention.default.decompose(
                q, k, v, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
            )
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        scores = aten.matmul.default(q, aten.transpose.int(k, -2, -1))  # (B, H, N, M)
        scores = aten.mul.Tensor(scores, scale)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # True: attend (transformers 5's text encoders)
                scores = aten.masked_fill.Scalar(scores, aten.logical_not.default(attn_mask), float("-inf"))
            else:
                scores = aten.add.Tensor(scores, attn_mask)
        return aten.matmul.default(aten._softmax.default(scores, -1, False), v)  # (B, H, N, Ev)

    return {aten.var_mean.correction: var_mean, aten.scaled_dot_product_attention.default: sdpa}


def partitioners(delegate: str) -> list:
    if delegate == "portable":
        return []
    if delegate == "coreml":
        from executorch.backends.apple.coreml.compiler import CoreMLBackend
        from executorch.backends.apple.coreml.partition import CoreMLPartitioner

        ct = import_coremltools()
        # fp16 programs (what the Neural Engine runs), iOS 17 / macOS 14 and later: as `--target coreml` exports
        specs = CoreMLBackend.generate_compile_specs(
            minimum_deployment_target=ct.target.iOS17, compute_precision=ct.precision.FLOAT16
        )
        return [CoreMLPartitioner(compile_specs=specs)]
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return [XnnpackPartitioner()]


def export_pte(
    spec: ComponentSpec,
    out_dir: Path,
    delegate: str = "xnnpack",
    stem: str = "model",
    keep_program: bool = False,
    float_module: torch.nn.Module | None = None,
    quantize_convolutions: bool = False,
) -> tuple[Path, dict]:
    """Trace `spec.module` with static example inputs, lower it to `delegate` and write `out_dir/<stem>.pte`;
    returns its path and what the delegate took (`delegation`). `keep_program`: also save the traced program,
    before lowering, as `<stem>.pt2` (for `merge_programs`). `float_module`: the module a quantized `spec.module`
    was made from, on which its XNNPACK twins are checked (`xnnpack_twin`). `quantize_convolutions`: int8 dense
    convolutions (`quantized_convolutions`; XNNPACK only)."""
    check_delegate(delegate)
    import_executorch()
    from executorch.exir import to_edge_transform_and_lower

    gen = torch.Generator().manual_seed(0)
    example = tuple(s.example(gen) for s in spec.inputs)
    module = spec.module.eval()
    # XNNPACK: ConvFusion and the norms through their twins, whose statistics the delegate takes (checked first)
    twins = contextlib.nullcontext() if delegate != "xnnpack" else xnnpack_twin(module, example, float_module)
    with twins as twin, torch.no_grad():
        program = torch.export.export(module, example)
        if quantize_convolutions:
            program, convolutions = quantized_convolutions(program, example)
        program = program.run_decompositions(_decompositions())
    with quiet_coremltools():
        lowered = to_edge_transform_and_lower(program, partitioner=partitioners(delegate))
    report = {**delegation(lowered.exported_program()), "xnnpack_twin": twin}
    if quantize_convolutions:
        report["int8_convolutions"] = convolutions
    if delegate == "coreml":  # ExecuTorch cannot run these here: their programs through the reference executor
        report["coreml_reference_vs_torch"] = coreml_delegate_parity(spec, lowered.exported_program())
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.pte"
    path.write_bytes(lowered.to_executorch().buffer)
    if keep_program:
        torch.export.save(program, path.with_suffix(".pt2"))
    return path, report


def merge_programs(methods: dict[str, Path], target: Path, delegate: str) -> dict:
    """One `.pte` with a method per entry of `methods` (method name -> a `.pte` written by `export_pte` with
    `keep_program`), lowered together so that the delegate stores the weights they share once; written to `target`
    (which may be one of the inputs) after every method is checked equal to its own program on the inputs it was
    traced with. The single programs and their traced `.pt2` are removed. Returns sizes and the check."""
    from executorch.exir import to_edge_transform_and_lower

    programs = {method: torch.export.load(path.with_suffix(".pt2")) for method, path in methods.items()}
    with quiet_coremltools():
        lowered = to_edge_transform_and_lower(programs, partitioner=partitioners(delegate))
    examples = {method: list(program.example_inputs[0]) for method, program in programs.items()}
    merged = target.with_name(f".{target.name}.merged")
    merged.write_bytes(lowered.to_executorch().buffer)
    del lowered, programs
    check = {}
    for method, path in methods.items():
        inputs = examples[method]
        got, ref = load_method(merged, method).execute(inputs), load_method(path).execute(inputs)
        diff = max(float((g - r).abs().max()) for g, r in zip(got, ref))
        if diff != 0.0:  # the same kernels on the same weights: any difference is a merge that changed the program
            raise RuntimeError(f"{target}: method {method} differs from its own program by {diff:.3g}")
        check[method] = diff
    before = sum(p.stat().st_size for p in methods.values())
    for path in methods.values():
        path.unlink()
        path.with_suffix(".pt2").unlink()
    merged.replace(target)
    return {"methods": list(methods), "bytes": target.stat().st_size, "bytes_before": before, "max_abs_vs_own": check}


# Layout-only operators: no arithmetic (XNNPACK folds most of them into its kernels' strides).
LAYOUT_OPS = ("view", "permute", "unsqueeze", "squeeze", "expand", "slice", "select", "clone", "alias", "dim_order")


def _op_name(node) -> str:
    return getattr(node.target, "__name__", str(node.target))  # an Edge op: "aten.linear.default"


def _shape(node) -> tuple:
    val = node.meta.get("val")
    val = val[0] if isinstance(val, (tuple, list)) else val
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def node_flops(node) -> int:
    """Arithmetic of one Edge operator from its static shapes: 2·out·K for linear / matmul / convolution (K the
    reduction length), one per output element for the rest, none for layout operators."""
    name, out = _op_name(node), int(np.prod(_shape(node))) if _shape(node) else 0
    if any(op in name for op in LAYOUT_OPS):
        return 0
    if ".linear." in name:
        return 2 * out * _shape(node.args[1])[-1]  # weight (out_features, in_features)
    if ".convolution." in name:
        return 2 * out * int(np.prod(_shape(node.args[1])[1:]))  # weight (C_out, C_in / groups, kh, kw)
    if any(f".{op}." in name for op in ("mm", "bmm", "matmul")):
        return 2 * out * _shape(node.args[0])[-1]
    if ".addmm." in name:
        return 2 * out * _shape(node.args[1])[-1]
    return out


def delegation(program) -> dict:
    """What the delegate took from a lowered Edge program: its operators and FLOPs (`node_flops`) inside delegate
    calls, and the operators left to ExecuTorch's portable CPU kernels (counted by name)."""
    gm = program.graph_module
    delegated_ops = delegated_flops = portable_flops = 0
    portable: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and hasattr(getattr(gm, node.target), "original_module"):
            inner = [n for n in getattr(gm, node.target).original_module.graph.nodes if n.op == "call_function"]
            delegated_ops += len([n for n in inner if "getitem" not in _op_name(n)])
            delegated_flops += sum(node_flops(n) for n in inner)
        elif node.op == "call_function" and _op_name(node) not in ("getitem", "executorch_call_delegate"):
            name = _op_name(node)
            portable[name] = portable.get(name, 0) + 1
            portable_flops += node_flops(node)
    return _delegation_report(delegated_ops, portable, delegated_flops + portable_flops, delegated_flops)


def _delegation_report(delegated_ops: int, portable: dict[str, int], flops: int, delegated_flops: int) -> dict:
    ops = delegated_ops + sum(portable.values())
    return {
        "delegated_ops": delegated_ops,
        "portable_ops": dict(sorted(portable.items())),
        "delegated_op_fraction": round(delegated_ops / ops, 4) if ops else 0.0,
        "delegated_flop_fraction": round(delegated_flops / flops, 4) if flops else 0.0,
        "gflops": round(flops / 1e9, 3),
        "flops": flops,
        "delegated_flops": delegated_flops,
    }


def coreml_delegate_parity(spec: ComponentSpec, program, seed: int = 1) -> dict:
    """The lowered program as an Apple device computes it, against the module in PyTorch on the same random inputs.

    ExecuTorch on Linux has no Core ML backend, so the program is evaluated here: the operators left outside the
    delegate in PyTorch (the Edge operators ExecuTorch's portable kernels implement), and every Core ML partition
    by the numpy reference executor on the `.mlpackage` the delegate embedded (unpacked from its payload). PSNR per
    output; raises UserError below the fp16 gate or on a non-finite output."""
    from executorch.backends.apple.coreml import executorchcoreml

    from ..runtime.manifest import GATES_DB
    from ..runtime.metrics import compare
    from ..runtime.mil import MILProgram

    gm = program.module()  # parameters as attributes: the interpreter takes the user inputs only
    gen = torch.Generator().manual_seed(seed)
    example = [s.example(gen) for s in spec.inputs]
    with torch.inference_mode():
        ref = spec.module(*example)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    with tempfile.TemporaryDirectory() as tmp:
        programs = {}
        for name, sub in gm.named_children():
            if getattr(sub, "backend_id", None) == "CoreMLBackend":
                folder = Path(tmp) / name
                folder.mkdir()
                # the payload is the delegate's folder (model.mlpackage, metadata.json), flattened into bytes
                unpacked = executorchcoreml.unflatten_directory_contents(sub.processed_bytes, str(folder))
                found = list(folder.glob("*/model.mlpackage"))
                if not unpacked or len(found) != 1:
                    raise RuntimeError(f"{spec.name}: cannot unpack the Core ML payload of {name}")
                meta = json.loads((found[0].parent / "metadata.json").read_text())
                mil = MILProgram(found[0], f"{spec.name}/{name}")
                programs[id(sub)] = (mil, meta["inputNames"], meta["outputNames"])

        class Hybrid(torch.fx.Interpreter):
            def call_function(self, target, args, kwargs):
                if target is not torch.ops.higher_order.executorch_call_delegate:
                    return super().call_function(target, args, kwargs)
                mil, inputs, outputs = programs[id(args[0])]
                out = mil.run({n: t.numpy() for n, t in zip(inputs, args[1:])})
                return tuple(torch.from_numpy(np.asarray(out[n], dtype=np.float32)) for n in outputs)

        with torch.no_grad():
            got = Hybrid(gm).run(*example)
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    gate = GATES_DB["fp16"]
    report = {"partitions": len(programs), "gate_db": gate, "outputs": {}}
    for s, r, g in zip(spec.outputs, ref, got):
        report["outputs"][s.name] = compare(r.float().numpy(), g.float().numpy())
    for name, c in report["outputs"].items():
        if not c["finite"] or c["psnr_db"] < gate:
            raise UserError(
                f"ExecuTorch {spec.name} (Core ML delegate): output {name} {c['psnr_db']:.1f} dB against PyTorch on "
                f"random inputs (finite: {c['finite']}), below the {gate:.0f} dB fp16 gate; refusing the export"
            )
    return report


def combine_delegation(reports: list[dict]) -> dict:
    """`delegation` of a chunked component: its chunks' reports summed (fractions of the whole chain)."""
    delegated_ops = sum(r["delegated_ops"] for r in reports)
    portable: dict[str, int] = {}
    for r in reports:
        for op, n in r["portable_ops"].items():
            portable[op] = portable.get(op, 0) + n
    flops, delegated_flops = sum(r["flops"] for r in reports), sum(r["delegated_flops"] for r in reports)
    combined = _delegation_report(delegated_ops, portable, flops, delegated_flops)
    if any("int8_convolutions" in r for r in reports):
        combined["int8_convolutions"] = sum(r.get("int8_convolutions", 0) for r in reports)
    return combined


def load_method(path: Path, method: str = "forward"):
    """A method of a .pte program, loaded by ExecuTorch's runtime (the one phones link)."""
    from executorch.runtime import Runtime

    try:
        return Runtime.get().load_program(str(path)).load_method(method)
    except Exception as e:  # the runtime raises RuntimeError / ValueError with its own status text
        raise UserError(f"{path}: ExecuTorch cannot load this program ({str(e).splitlines()[0]})") from None


def pte_parity(spec: ComponentSpec, path: Path, seed: int = 1) -> dict:
    """Run the program in ExecuTorch's runtime and the module in PyTorch on the same random inputs: max |diff| per
    output."""
    gen = torch.Generator().manual_seed(seed)
    example = [s.example(gen) for s in spec.inputs]
    with torch.inference_mode():
        ref = spec.module(*example)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    got = load_method(path).execute(example)
    for s, g in zip(spec.outputs, got):
        if tuple(g.shape) != tuple(s.shape):
            raise RuntimeError(f"{spec.name}: ExecuTorch returned {s.name} of shape {tuple(g.shape)}, spec {s.shape}")
    return {s.name: float(np.abs(g.numpy() - r.numpy()).max()) for s, g, r in zip(spec.outputs, got, ref)}
