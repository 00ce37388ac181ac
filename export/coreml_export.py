"""Core ML export of one component: model + spec -> model.mlpackage (an ML program with static shapes), checked.

Conversion path: `torch.export.export` -> `run_decompositions(table)` -> `coremltools.convert`. The older
`torch.jit.trace` route of coremltools fails with numpy >= 2.4, and torch.export is the path
coremltools develops for new torch releases, so it is the only one used. `run_decompositions` is given the empty
(= keep ATen ops) table that coremltools asks for, plus decompositions of the few ATen ops its torch frontend
does not know (listed in `_decompositions`); anything else would lower ops such as layer_norm into primitives
and lose coremltools' fused MIL ops.

The Core ML program takes the same input and output names as the ONNX export. Token ids are int32 inside
Core ML (it has no int64 tensors): the manifest keeps the package's int64 interface and the backends cast.
Float inputs and outputs stay fp32 in fp16 programs (as the ONNX fp16 export with keep_io_types).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..runtime.errors import UserError
from ..runtime.manifest import GATES_DB
from ..runtime.metrics import compare
from ..runtime.package import installed_version
from .components import ComponentSpec
from .coreml_twin import ane_twin

logger = logging.getLogger(__name__)

COMPUTE_PRECISIONS = ("fp16", "fp32")
# CLI name -> coremltools.target member. iOS17 / macOS14 (ML program spec 8) is the oldest target with the int8
# activation quantization ops (quantize / dequantize) and per-channel weight quantization; iOS18 / macOS15 add
# blockwise / grouped compression and the fused scaled_dot_product_attention op.
DEPLOYMENT_TARGETS = {"iOS17": "iOS17", "iOS18": "iOS18", "macOS14": "macOS14", "macOS15": "macOS15"}
MLPACKAGE = "model.mlpackage"


@contextlib.contextmanager
def quiet_coremltools():
    """coremltools' own logger at ERROR while the block runs, restored afterwards even on failure: it logs every
    converted and removed op at INFO, and warns about versions and the missing macOS runtime."""
    ct_logger = logging.getLogger("coremltools")
    level = ct_logger.level
    ct_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ct_logger.setLevel(level)


def import_coremltools():
    """coremltools, imported with its import-time notices silenced: it warns that torch 2.13 is newer than the
    torch it was tested with (2.7) and that it has no macOS runtime here; the reference executor checks every
    converted program numerically instead."""
    with quiet_coremltools():
        import coremltools
    return coremltools


def check_options(compute_precision: str, deployment_target: str) -> None:
    """UserError for an unknown precision or deployment target (before anything is loaded or written)."""
    if compute_precision not in COMPUTE_PRECISIONS:
        raise UserError(
            f"unknown --compute-precision {compute_precision!r}; expected one of {', '.join(COMPUTE_PRECISIONS)}"
        )
    if deployment_target not in DEPLOYMENT_TARGETS:
        raise UserError(
            f"unknown --deployment-target {deployment_target!r}; expected one of {', '.join(DEPLOYMENT_TARGETS)}"
        )


def _decompositions(program=None) -> dict:
    """ATen ops that coremltools 9's torch.export frontend does not convert, rewritten into ones it does.

    Fixed rewrites for the ops our models are known to emit, plus torch's own decomposition of any other op of
    `program` that coremltools does not know (the model code evolves; a new fused op should not break export).
    """
    from torch._decomp import decomposition_table, get_decompositions

    aten = torch.ops.aten
    table = get_decompositions(
        [aten.new_ones, aten.new_zeros, aten.new_full, aten.new_empty, aten.addcmul]
    )  # addcmul: ConvFusion's fused GroupNorm affine
    # ConvFusion's GroupNorm statistics (torch's own var_mean decomposition emits prims.var, unknown to coremltools)
    table[aten.var_mean.correction] = lambda x, dim=None, *, correction=None, keepdim=False: (
        aten.var.correction(x, dim, correction=correction, keepdim=keepdim),
        aten.mean.dim(x, dim, keepdim),
    )
    # T5's and CLIP's masks: `mask_a & mask_b`, `where(mask, x, scalar)` and `alias` (transformers 5).
    table[aten.__and__.Tensor] = lambda a, b: aten.bitwise_and.Tensor(a, b)
    table[aten.where.ScalarOther] = lambda c, a, o: aten.where.self(c, a, aten.full_like.default(a, o))
    table[aten.where.ScalarSelf] = lambda c, s, b: aten.where.self(c, aten.full_like.default(b, s), b)
    table[aten.alias.default] = lambda x: aten.alias_copy.default(x)
    for op in _unsupported_ops(program) if program is not None else []:
        if op not in table and op in decomposition_table:
            table[op] = decomposition_table[op]
    return table


def _unsupported_ops(program) -> list:
    """The ATen ops of an exported program that coremltools' torch frontend has no converter for."""
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY
    from coremltools.converters.mil.frontend.torch.utils import sanitize_op_kind

    ops = []
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if sanitize_op_kind(node.target.name()) not in _TORCH_OPS_REGISTRY and node.target not in ops:
                ops.append(node.target)
    return ops


def _example(spec: ComponentSpec, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(s.example(gen) for s in spec.inputs)


def _name_inputs(ct, mlmodel, names: list[str]):
    """The program with its inputs named `names`, in order. The torch.export route names a program's inputs after
    the forward's parameters: a transformer chunk's forward takes `*args` (its inputs depend on where the model is
    cut), which would make them args_0, args_1, ..."""
    spec = mlmodel.get_spec()
    current = [i.name for i in spec.description.input]
    if current == names or len(current) != len(names):
        return mlmodel  # a count mismatch is reported by the caller's check
    for old, new in zip(current, names):
        ct.utils.rename_feature(spec, old, new, rename_outputs=False)
    return ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)


def export_coreml(
    spec: ComponentSpec,
    out_dir: Path,
    compute_precision: str = "fp16",
    deployment_target: str = "iOS17",
    metadata: dict | None = None,
    seed: int = 0,
    twin: bool = True,
    stem: str = "model",
) -> Path:
    """Convert `spec.module` with static example inputs; writes `out_dir/<stem>.mlpackage` and returns its path.

    With `twin`, EDiT self-attentions are converted through their Neural Engine twin (export/coreml_twin.py),
    checked equal to the reference on the example inputs first."""
    check_options(compute_precision, deployment_target)
    ct = import_coremltools()

    out_dir.mkdir(parents=True, exist_ok=True)
    module = spec.module.eval()
    with quiet_coremltools(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        example = _example(spec, seed)
        with ane_twin(module, example) if twin else contextlib.nullcontext() as twin_report:
            program = torch.export.export(module, example)
        program = program.run_decompositions(_decompositions(program))
        mlmodel = ct.convert(
            program,
            outputs=[
                ct.TensorType(name=s.name, dtype=np.float32 if s.dtype.startswith("float") else np.int32)
                for s in spec.outputs
            ],
            convert_to="mlprogram",
            compute_precision=ct.precision.FLOAT16 if compute_precision == "fp16" else ct.precision.FLOAT32,
            minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGETS[deployment_target]),
            skip_model_load=True,  # loading compiles the model: macOS only
        )
    mlmodel = _name_inputs(ct, mlmodel, [s.name for s in spec.inputs])
    got_in = [i.name for i in mlmodel.get_spec().description.input]
    got_out = [o.name for o in mlmodel.get_spec().description.output]
    if got_in != [s.name for s in spec.inputs] or got_out != [s.name for s in spec.outputs]:
        raise RuntimeError(
            f"{spec.name}: Core ML program has inputs {got_in} / outputs {got_out}, the spec "
            f"{[s.name for s in spec.inputs]} / {[s.name for s in spec.outputs]}"
        )
    meta = metadata or {}
    version = installed_version("edit-mobile") or "unknown"
    mlmodel.short_description = (
        f"edit-mobile {spec.name} of {meta.get('source', '?')} "
        f"({meta.get('architecture', '?')}), {compute_precision}, static shapes"
    )
    mlmodel.author = "edit-mobile"
    mlmodel.version = version
    for s in spec.inputs:
        mlmodel.input_description[s.name] = f"{s.dtype} {list(s.shape)}"
    for s in spec.outputs:
        mlmodel.output_description[s.name] = f"{s.dtype} {list(s.shape)}"
    mlmodel.user_defined_metadata.update(
        {
            "edit_mobile.component": spec.name,
            "edit_mobile.source": str(meta.get("source", "")),
            "edit_mobile.architecture": str(meta.get("architecture", "")),
            "edit_mobile.compute_precision": compute_precision,
            "edit_mobile.deployment_target": deployment_target,
            "edit_mobile.io": json.dumps(spec.io_dict()),
            "edit_mobile.ane_twin": json.dumps(twin_report),
        }
    )
    path = out_dir / f"{stem}.mlpackage"
    mlmodel.save(str(path))
    logger.info("exported %s: %.1f MB", spec.name, package_size(path) / 1e6)
    return path


def save_multifunction(functions: dict[str, Path], default: str, out: Path) -> None:
    """Merge one-function ML programs into the multi-function program `out` (function name -> .mlpackage; the
    sources are removed). coremltools deduplicates the weights the functions share."""
    ct = import_coremltools()
    descriptor = ct.utils.MultiFunctionDescriptor()
    for name, path in functions.items():
        descriptor.add_function(str(path), src_function_name="main", target_function_name=name)
    descriptor.default_function_name = default
    tmp = out.with_name(f"merging-{out.name}")  # coremltools wants the .mlpackage suffix
    with quiet_coremltools():
        ct.utils.save_multifunction(descriptor, str(tmp))
    for path in functions.values():
        shutil.rmtree(path)
    tmp.rename(out)


def extract_function(src: Path, function: str, out: Path) -> Path:
    """One function of a multi-function ML program as a one-function program `out` (its function `main`).

    coremltools.optimize refuses multi-function models; Apple's recipe is to compress each function's program and
    merge them again (`save_multifunction`). coremltools has no public way back from a merged program, so this
    reads it into a pymil program (the internal loader its own compression passes use; coremltools is pinned),
    keeps the one function and converts it back without running any pass: the ops and weights are unchanged."""
    ct = import_coremltools()
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.models.utils import _apply_graph_pass

    with quiet_coremltools():
        model = ct.models.MLModel(str(src), skip_model_load=True)
        version = model.get_spec().specificationVersion
        program = _apply_graph_pass(model, [], spec_version=version, return_pymil_prog=True)
        if function not in program.functions:
            raise UserError(f"{src} has no function {function!r} (it has {', '.join(program.functions)})")
        kept = program.functions[function]
        program.functions.clear()
        program.functions["main"] = kept
        program.default_function_name = "main"
        one = mil_convert(
            program,
            convert_to="mlprogram",
            convert_from="milinternal",
            specification_version=version,
            compute_units=ct.ComputeUnit.ALL,
            skip_model_load=True,
        )
        one.save(str(out))
    return out


def package_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def coreml_parity(
    spec: ComponentSpec, path: Path, compute_precision: str, seed: int = 1, gate_db: float | None = None
) -> dict:
    """Run the saved program in the numpy reference executor and the module in PyTorch on the same random inputs.

    Raises UserError (with the numbers) below the precision's gate or on a non-finite output."""
    from ..runtime.mil import MILProgram

    example = _example(spec, seed)
    with torch.inference_mode():
        ref = spec.module(*example)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    start = time.perf_counter()
    program = MILProgram(path, spec.name)
    got = program.run({s.name: t.numpy() for s, t in zip(spec.inputs, example)})
    seconds = time.perf_counter() - start
    gate = GATES_DB[compute_precision] if gate_db is None else gate_db
    report = {"executor_seconds": round(seconds, 2), "gate_db": gate, "outputs": {}}
    for s, r in zip(spec.outputs, ref):
        g = got[s.name]
        if g.shape != s.shape:
            raise RuntimeError(f"{spec.name}: the Core ML program returned {s.name} of shape {g.shape}, spec {s.shape}")
        report["outputs"][s.name] = compare(r.float().numpy(), g.astype(np.float32))
    worst = min(report["outputs"].values(), key=lambda c: c["psnr_db"] if c["finite"] else -1e9)
    name = next(k for k, v in report["outputs"].items() if v is worst)
    if not worst["finite"]:
        raise UserError(
            f"Core ML {spec.name} ({compute_precision}): output {name} is not finite in the reference "
            f"executor (fp16 overflow?); refusing the export"
        )
    if worst["psnr_db"] < gate:
        raise UserError(
            f"Core ML {spec.name} ({compute_precision}): PSNR {worst['psnr_db']:.1f} dB against PyTorch "
            f"on random inputs ({name}), below the {gate:.0f} dB gate; refusing the export"
        )
    return report
