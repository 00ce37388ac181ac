"""Quantization of one ONNX component: fp16, int8 dynamic, int8 static (QDQ), int8 weight-only.

Every transformation is ONNX Runtime's own (`onnxruntime.transformers.float16`, `onnxruntime.quantization`); this
module only chooses what they apply to and says why:
  fp16          `convert_float_to_float16(keep_io_types=True)` (fp32 inputs / outputs kept) with a block-list of
                nodes that stay fp32 (`fp16_block_list`, reasons below and in docs/quantization.md);
  int8-dynamic  `quantize_dynamic`: int8 weights, activations quantized at run time (MatMulInteger);
  int8-static   `quantize_static`, QDQ format, activation ranges calibrated on recorded denoiser inputs;
  int8-weights  `MatMulNBitsQuantizer(bits=8)`: int8 weights in blocks, dequantized and computed in fp32;
  int4-weights  the same with 4 bits (blocks of 32 with zero points; RTN or HQQ), the most sensitive layers
                optionally kept at 8 bits.
ONNX Runtime's basic graph optimisation (run at export) fuses MatMul + Add into `Gemm`. The dynamic and weight-only
quantizers have no Gemm entry (their registries quantize MatMul), so `unfuse_gemm` turns those Gemms back into
MatMul + Add first; the static QDQ quantizer handles Gemm itself. Neither of those two has a usable Conv form, so
they get int8 Conv weights behind a DequantizeLinear (`int8_conv_weights`, weight-only, fp32 convolution).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..runtime.metrics import psnr
from .onnx_files import EXTERNAL_DATA_THRESHOLD, external_data_file, save_onnx

logger = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
FP16_MAX = 65504.0
# A tensor whose calibrated magnitude exceeds FP16_MAX / FP16_HEADROOM keeps fp32: calibration prompts are few,
# and other prompts, seeds or guidance scales reach larger activations than the recorded ones.
FP16_HEADROOM = 2.0
# Magnitudes from this on are masking sentinels (T5 / CLIP fill masked attention scores with float32's lowest
# value), not activations: the converter clamps them to -65504, which masks just as well before a softmax.
MASK_SENTINEL = 1e30
# Static QDQ: the op types whose inputs and outputs get quantize / dequantize pairs (weights: int8, activations:
# uint8, the combination ONNX Runtime's CPU kernels are tuned for).
STATIC_OP_TYPES = ("Gemm", "MatMul", "Conv")


# --- loading and saving ------------------------------------------------------------------------------------------
def load_model(path: str | Path) -> onnx.ModelProto:
    return onnx.load(str(path))  # also loads external data (model.onnx.data) next to it


def save_model(model: onnx.ModelProto, path: str | Path) -> list[Path]:
    """Save `model` to `path`, its weights in one external file when over the 2 GB protobuf limit; the files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    save_onnx(model, path, large)
    return [path, path.parent / external_data_file(path)] if large else [path]


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name: block-lists and exclusion lists refer to nodes by name."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.name or node.op_type}__{i}"
        seen.add(node.name)


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder the nodes so each comes after the producers of its inputs (in place).

    The float16 converter appends the Casts of the kept fp32 graph inputs at the end of the node list; ONNX Runtime
    does not mind, but the ONNX checker and other consumers (onnx.reference, converters) require sorted graphs.
    """
    available = {i.name for i in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    pending, ordered = list(model.graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise RuntimeError(f"graph has a cycle or a missing input near node {rest[0].name!r}")
        pending = rest
    del model.graph.node[:]
    model.graph.node.extend(ordered)


# --- ONNX Runtime's quantizers: their logging, scoped -------------------------------------------------------------
# Nothing here touches process-wide logging state (the root logger's level, handlers or filters, logging.disable):
#   - the quantizers' own loggers (`onnxruntime.quantization.*`: MatMulNBitsQuantizer logs one INFO line per node)
#     are set to WARNING while they run and restored afterwards, also when they raise;
#   - the "please run pre-processing" hint that quantize_dynamic / quantize_static log is answered with ONNX
#     Runtime's own switch: `edit-mobile quantize` gives the exported models it quantizes ONNX Runtime's
#     pre-processing mark (`mark_preprocessed`), because the export already applied that pre-processing (a model
#     without the mark gets the hint, rightly);
#   - importing matmul_nbits_quantizer calls logging.basicConfig(level=INFO); `_import_matmul_nbits_quantizer`
#     puts the root logger's handlers and level back as they were.
# The per-tensor notes ONNX Runtime's quantizers log with `logging.info` on the root logger itself show only where
# the application has set the root logger to INFO; such an application can filter them out of its own handlers
# with `OrtQuantizerNotes` (`edit-mobile quantize` does, cli/quantize.py). Likewise the histogram calibrators
# (entropy, percentile) `print` their progress to stdout; only the application may swap sys.stdout, and
# `edit-mobile quantize` does.
ORT_QUANTIZATION_LOGGER = "onnxruntime.quantization"
_ORT_QUANTIZATION_DIR = os.path.join("onnxruntime", "quantization", "")


class OrtQuantizerNotes(logging.Filter):
    """For an application's log handlers: drops the INFO / DEBUG records that ONNX Runtime's quantizers log on the
    root logger (`logging.info(...)`, one per tensor, e.g. 'Quantization parameters for tensor ... not specified'),
    which no logger level of theirs controls. Everything else passes, their warnings included."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.name == "root" and record.levelno < logging.WARNING and _ORT_QUANTIZATION_DIR in record.pathname
        )


@contextlib.contextmanager
def quiet_ort_quantization():
    """ONNX Runtime's quantization loggers (`onnxruntime.quantization` and its modules) at WARNING while the block
    runs, their level restored afterwards even on failure; warnings still show."""
    ort_logger = logging.getLogger(ORT_QUANTIZATION_LOGGER)
    level = ort_logger.level
    ort_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        ort_logger.setLevel(level)


def mark_preprocessed(model: onnx.ModelProto) -> None:
    """Give `model` ONNX Runtime's "pre-processed for quantization" mark (onnxruntime.quantization.quant_utils.
    add_pre_process_metadata), in place.

    ONNX Runtime's pre-processing (`quant_pre_process`) is shape inference plus its basic graph optimisation. Our
    export already ran both (export/onnx_export.py: ONNX Runtime's basic level, then strict ONNX shape inference
    with every shape static), so the quantizers' hint to run it would only be noise."""
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    add_pre_process_metadata(model)


def _import_matmul_nbits_quantizer():
    """onnxruntime.quantization.matmul_nbits_quantizer, imported without its import-time logging.basicConfig(level=
    INFO) changing the root logger (in a process whose root logger had no handler, that call adds a stderr handler
    and lowers the root level to INFO for good)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
    return matmul_nbits_quantizer


# --- graph structure ---------------------------------------------------------------------------------------------
def _producers(model):
    return {o: n for n in model.graph.node for o in n.output}


def _consumers(model):
    out = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _const(model, name):
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    return None


def linear_attention_nodes(model: onnx.ModelProto) -> list[str]:
    """The EDiT / MM-EDiT linear-attention kernel, found by its structure (`relu_linear_attention`):

    `[S | z] = (K / M)^T [V | 1]` is the MatMul whose second input is a Concat with a constant all-ones tensor (the
    pad-V-with-ones trick), `Q [S | z]` the MatMul that consumes it, then the Slices that split numerator and
    denominator, the `+ eps` Add and the Div. Returns their node names (empty for a softmax-only graph).
    """
    producers, consumers = _producers(model), _consumers(model)
    inits = {t.name for t in model.graph.initializer}
    names = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        cat = producers.get(node.input[1])
        if cat is None or cat.op_type != "Concat":
            continue
        if not any(i in inits and np.all(_const(model, i) == 1) for i in cat.input):
            continue
        names.append(node.name)
        for qs in consumers.get(node.output[0], []):  # Q [S | z]
            if qs.op_type != "MatMul":
                continue
            names.append(qs.name)
            frontier = [qs.output[0]]
            for _ in range(3):  # Slice -> (Add eps) -> Div
                nxt = []
                for value in frontier:
                    for c in consumers.get(value, []):
                        if c.op_type in ("Slice", "Add", "Div") and c.name not in names:
                            names.append(c.name)
                            if c.op_type != "Div":
                                nxt.append(c.output[0])
                frontier = nxt
    return names


def normalization_nodes(model: onnx.ModelProto) -> list[str]:
    """Normalisation statistics: LayerNormalization / InstanceNormalization (GroupNorm) nodes (and ONNX Runtime's
    fused Skip* forms), and the written-out
    mean-of-squares chains (T5's RMSNorm: Pow -> ReduceMean -> Add -> Sqrt -> Div; ConvFusion's GroupNorm:
    ReduceMean -> Sub -> Mul(x, x) -> ReduceMean -> Add -> Sqrt -> Div)."""
    producers = _producers(model)
    names = [
        n.name
        for n in model.graph.node
        if n.op_type
        in (
            "LayerNormalization",
            "InstanceNormalization",
            "GroupNormalization",
            "SimplifiedLayerNormalization",
            "SkipLayerNormalization",  # ONNX Runtime's fused residual + LayerNorm (export --graph fused)
            "SkipSimplifiedLayerNormalization",
        )
    ]
    for node in model.graph.node:
        if node.op_type != "Sqrt":
            continue
        # walk back Sqrt <- Add(eps) <- ReduceMean <- Pow / Mul(x, x) (<- Sub <- ReduceMean for a centred variance)
        chain, value = [node.name], node.input[0]
        for _ in range(5):
            p = producers.get(value)
            if p is None or p.op_type not in ("Add", "ReduceMean", "Pow", "Mul", "Sub"):
                break
            chain.append(p.name)
            if p.op_type == "Pow" or (p.op_type == "Mul" and p.input[0] == p.input[1]):
                break
            value = p.input[0]
        else:
            chain = chain[:1]
        if len(chain) >= 3:
            names += chain
            for c in _consumers(model).get(node.output[0], []):  # 1 / sqrt(var + eps)
                if c.op_type in ("Div", "Reciprocal"):
                    names.append(c.name)
    return list(dict.fromkeys(names))


def graph_input_readers(model: onnx.ModelProto, op_types=STATIC_OP_TYPES) -> list[str]:
    """Weighted nodes that read a float graph input directly (the latent `sample`, `latent_sample`, ...)."""
    float_inputs = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    return [n.name for n in model.graph.node if n.op_type in op_types and any(i in float_inputs for i in n.input)]


def drop_unused_initializers(model: onnx.ModelProto, candidates) -> None:
    """Remove the initializers among `candidates` that no node reads any more (after a rewrite replaced them)."""
    read = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in read or t.name not in candidates]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def unfuse_gemm(model: onnx.ModelProto) -> int:
    """Gemm(A, B, C) with a constant B -> MatMul(A, B or B^T) + Add(C), in place; returns how many were unfused.

    ONNX Runtime's basic optimisation fuses every Linear layer (MatMul + Add) into a Gemm, which the dynamic and
    weight-only int8 quantizers do not handle: without this, they would leave every weight in fp32.
    """
    inits = {t.name: t for t in model.graph.initializer}
    new_nodes, count, transposed = [], 0, set()
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type != "Gemm"
            or node.input[1] not in inits
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            new_nodes.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[weight]).T
            t = numpy_helper.from_array(np.ascontiguousarray(w), f"{weight}__KxN")
            model.graph.initializer.append(t)
            transposed.add(weight)
            weight = t.name
        has_bias = len(node.input) > 2 and node.input[2] != ""
        mm_out = f"{node.output[0]}__matmul" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], weight], [mm_out], name=f"{node.name}__MatMul"))
        if has_bias:
            new_nodes.append(
                helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}__Add")
            )
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    drop_unused_initializers(model, transposed)
    return count


def int8_conv_weights(model: onnx.ModelProto, exclude=()) -> int:
    """Weight-only int8 for Conv, in place: each constant Conv weight becomes an int8 initializer (symmetric, one
    scale per output channel, computed by ONNX Runtime's own `quant_utils.quantize_data`) read through a
    `DequantizeLinear(axis=0)`; the convolution itself stays fp32. Returns the number of Convs changed.

    The dynamic and weight-only ONNX Runtime quantizers leave Conv in fp32 (dynamic ConvInteger is slower than the
    fp32 Conv on CPU, MatMulNBits has no Conv form), yet EDiT's ConvFusion convolutions hold ~13 % of the
    transformer's weights: without this, an "int8" EDiT transformer would still be 0.36x its fp32 size.
    """
    from onnxruntime.quantization.quant_utils import quantize_data

    inits = {t.name: t for t in model.graph.initializer}
    done: dict[str, str] = {}
    count = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name in exclude or node.input[1] not in inits:
            continue
        name = node.input[1]
        if name not in done:
            w = numpy_helper.to_array(inits[name]).astype(np.float32)
            q = np.empty(w.shape, np.int8)
            scales = np.empty(w.shape[0], np.float32)
            for o in range(w.shape[0]):  # per output channel
                zero, scale, qo_ = quantize_data(w[o].ravel(), onnx.TensorProto.INT8, symmetric=True)
                assert int(zero) == 0
                q[o], scales[o] = np.asarray(qo_, np.int8).reshape(w.shape[1:]), float(scale)
            model.graph.initializer.extend(
                [
                    numpy_helper.from_array(q, f"{name}__int8"),
                    numpy_helper.from_array(scales, f"{name}__scale"),
                    numpy_helper.from_array(np.zeros(w.shape[0], np.int8), f"{name}__zero_point"),
                ]
            )
            model.graph.node.append(
                helper.make_node(
                    "DequantizeLinear",
                    [f"{name}__int8", f"{name}__scale", f"{name}__zero_point"],
                    [f"{name}__dq"],
                    name=f"{name}__DequantizeLinear",
                    axis=0,
                )
            )
            done[name] = f"{name}__dq"
        node.input[1] = done[name]
        count += 1
    drop_unused_initializers(model, done)
    topological_sort(model)
    return count


def int8_embedding_tables(model: onnx.ModelProto, exclude=()) -> int:
    """Weight-only int8 for embedding tables, in place: each 2-D constant table read by a `Gather` along axis 0 is
    stored int8 with one scale per row (symmetric, ONNX Runtime's `quant_utils.quantize_data`), and the lookup
    becomes Gather(int8 rows) -> Cast -> Mul(Gather(row scales)). Returns the number of Gathers changed.

    A text encoder's token table is the largest tensor no quantizer touches (T5-XXL's is 526 MB, 2.8 % of the
    encoder: at 4 bits elsewhere it is 17 % of the package). Gathering before dequantizing keeps the table int8 in
    memory too, where a DequantizeLinear in front of the table would be folded into an fp32 copy at load. ONNX
    Runtime's own int4 Gather (GatherBlockQuantized) needs an opset past the 17 our graphs are valid in."""
    from onnxruntime.quantization.quant_utils import quantize_data

    inits = {t.name: t for t in model.graph.initializer}
    quantized: set[str] = set()
    new_nodes = []
    count = 0
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (
            table is None
            or node.name in exclude
            or table.data_type != onnx.TensorProto.FLOAT
            or len(table.dims) != 2
            or axis != 0
        ):
            new_nodes.append(node)
            continue
        name, out = table.name, node.output[0]
        if name not in quantized:
            w = numpy_helper.to_array(table)
            q = np.empty(w.shape, np.int8)
            scales = np.empty((w.shape[0], 1), np.float32)
            for r in range(w.shape[0]):
                zero, scale, q_row = quantize_data(w[r], onnx.TensorProto.INT8, symmetric=True)
                assert int(zero) == 0
                q[r], scales[r, 0] = np.asarray(q_row, np.int8), float(scale)
            model.graph.initializer.extend(
                [numpy_helper.from_array(q, f"{name}__int8"), numpy_helper.from_array(scales, f"{name}__row_scale")]
            )
            quantized.add(name)
        ids = node.input[1]
        new_nodes += [
            helper.make_node("Gather", [f"{name}__int8", ids], [f"{out}__int8"], name=f"{node.name}__int8", axis=0),
            helper.make_node("Cast", [f"{out}__int8"], [f"{out}__float"], name=f"{node.name}__Cast", to=1),
            helper.make_node(
                "Gather", [f"{name}__row_scale", ids], [f"{out}__scale"], name=f"{node.name}__scale", axis=0
            ),
            helper.make_node("Mul", [f"{out}__float", f"{out}__scale"], [out], name=f"{node.name}__Mul"),
        ]
        count += 1
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    drop_unused_initializers(model, quantized)
    return count


# ONNX Runtime session options a package records for int8-dynamic / int8-weights components
# (`ort_session_config` in the manifest, applied by runtime.backends): with ONNX Runtime's QDQ handling on, its
# constant folding keeps the DequantizeLinear in front of each int8 Conv weight (to preserve QDQ node groups), so the
# Conv sees a non-constant weight and loses its prepacked NCHWc kernel (mid-size EDiT at 512²: 0.76x fp32 latency
# instead of 0.68x). These graphs have no QuantizeLinear / DequantizeLinear pairs to keep, so QDQ handling is off:
# the int8 weights are dequantized once at load.
WEIGHT_DQ_SESSION_CONFIG = {"session.disable_quant_qdq": "1"}


# --- measurement -------------------------------------------------------------------------------------------------
def make_session(path: str | Path, threads: int | None = None, session_config: dict | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    for key, value in (session_config or {}).items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_feeds(path_or_session, feeds: list[dict], threads: int | None = None) -> list[list[np.ndarray]]:
    session = make_session(path_or_session, threads) if isinstance(path_or_session, (str, Path)) else path_or_session
    return [[o.astype(np.float32) for o in session.run(None, feed)] for feed in feeds]


def output_psnr(reference: list[list[np.ndarray]], test: list[list[np.ndarray]]) -> float:
    """The worst PSNR (dB) over every feed and every output."""
    return min(psnr(r, t) for rs, ts in zip(reference, test) for r, t in zip(rs, ts))


def tensor_ranges(path: str | Path, feeds: list[dict]) -> dict[str, float]:
    """max |x| of every float intermediate tensor over `feeds` (ONNX Runtime's MinMax calibrator, fp32 graph)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    with tempfile.TemporaryDirectory() as tmp:
        calibrator = create_calibrator(
            Path(path),
            [],
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=True,
        )
        collect_in_chunks(calibrator, feeds)
        data = calibrator.compute_data()
        del calibrator
    return {
        name: float(max(abs(np.asarray(d.range_value[0]).min()), abs(np.asarray(d.range_value[1]).max())))
        for name, d in data.data.items()
    }


# --- fp16 ----------------------------------------------------------------------------------------------------------
# Why each kind of node stays fp32 in an fp16 package (docs/quantization.md has the measurements behind these).
FP16_BLOCK_REASONS = {
    "linear-attention": "EDiT linear-attention accumulators [S|z] = K^T[V|1] / M, Q[S|z] and the numerator / "
    "denominator division: sums over all compressed tokens, and the denominator decides the "
    "scale of the output; kept fp32 as the PyTorch model does (EDiTConfig.accumulate_fp32), "
    "docs/method.md",
    "normalization": "normalisation statistics (LayerNorm, GroupNorm / InstanceNorm, T5 RMSNorm, ConvFusion "
    "GroupNorm): a mean of squares overflows fp16 once |x| > 256, and the reference kernels "
    "(torch LayerNorm / GroupNorm, transformers' T5LayerNorm) accumulate in fp32",
    "range": "reads or writes a value measured on the calibration trajectory above 65504 / 2 (fp16 max with 2x "
    "headroom; masking sentinels of 1e30 and more excepted)",
}


def fp16_block_list(
    model: onnx.ModelProto,
    ranges: dict[str, float] | None = None,
    rules: tuple[str, ...] = ("linear-attention", "normalization", "range"),
) -> dict[str, str]:
    """node name -> reason, for the nodes that stay fp32 in the fp16 model."""
    block: dict[str, str] = {}
    if "linear-attention" in rules:
        block.update({n: "linear-attention" for n in linear_attention_nodes(model)})
    if "normalization" in rules:
        block.update({n: "normalization" for n in normalization_nodes(model) if n not in block})
    if "range" in rules and ranges:
        limit = FP16_MAX / FP16_HEADROOM
        big = {v for v, r in ranges.items() if limit < r < MASK_SENTINEL}
        for node in model.graph.node:
            if node.name not in block and any(v in big for v in [*node.input, *node.output]):
                block[node.name] = "range"
    return block


def convert_fp16(src: Path, dst: Path, block: dict[str, str]) -> list[Path]:
    """ONNX Runtime's float16 converter, fp32 inputs / outputs kept, `block` nodes left in fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    # The path form runs shape inference through a file, which also works for models over 2 GB.
    model = convert_float_to_float16(str(src), keep_io_types=True, node_block_list=sorted(block))
    topological_sort(model)
    return save_model(model, dst)


# --- int8 ----------------------------------------------------------------------------------------------------------
@dataclass
class QuantOptions:
    per_channel: bool = False
    calibration_method: str = "minmax"
    # int8-dynamic / int8-static weights in 7 bits (ONNX Runtime's reduce_range) unless full_range_weights: why at
    # quantize_static_int8; docs/quantization.md measures what each costs
    full_range_weights: bool = False
    exclude: dict[str, str] = field(default_factory=dict)  # node name -> reason


def prepare_weight_only(src: Path, dst: Path, exclude=()) -> dict:
    """src -> dst with its Gemms unfused (for the dynamic and weight-only quantizers, which quantize MatMul), its
    Conv weights and embedding tables stored int8 (`int8_conv_weights`, `int8_embedding_tables`); returns what was
    changed."""
    model = load_model(src)
    name_nodes(model)
    gemms = unfuse_gemm(model)
    convs = int8_conv_weights(model, exclude)
    tables = int8_embedding_tables(model, exclude)
    save_model(model, dst)  # keeps the model's metadata, ONNX Runtime's pre-processing mark included
    return {"gemm_unfused": gemms, "conv_weights_int8": convs, "embedding_tables_int8": tables}


def quantize_dynamic_int8(src: Path, dst: Path, opts: QuantOptions) -> dict:
    """int8 weights of every MatMul with a constant weight (Linear layers), activations quantized at run time.

    Conv weights are stored int8 but computed in fp32 (`int8_conv_weights`): ONNX Runtime's dynamic ConvInteger
    ran 3x slower than the fp32 Conv on this project's CPU (tiny VAE decoder at 256²: 0.88 s vs 0.30 s; mid-size
    EDiT transformer at 512²: 1.17x fp32 with ConvInteger, 0.72x without).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        unfused = Path(tmp) / "unfused.onnx"
        changed = prepare_weight_only(src, unfused, opts.exclude)
        with quiet_ort_quantization():
            quantize_dynamic(
                unfused,
                dst,
                op_types_to_quantize=["MatMul"],
                per_channel=opts.per_channel,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=_unfused_names(opts.exclude),
                use_external_data_format=_large(unfused),
                extra_options={"MatMulConstBOnly": True},
                reduce_range=not opts.full_range_weights,  # 7-bit weights by default: why at quantize_static
            )
    return {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "format": "QOperator (MatMulInteger)",
        "weights": "int8, symmetric (Conv: int8 per output channel through DequantizeLinear, fp32 compute)",
        "weight_range_bits": 8 if opts.full_range_weights else 7,  # MatMul weights
        "activations": "uint8, quantized at run time (Conv: fp32)",
        "op_types": ["MatMul", "Conv"],
        **changed,
    }


def calibrate_ranges(src: Path, feeds: list[dict], method: str, cache: Path) -> None:
    """Activation ranges of every tensor of the STATIC_OP_TYPES nodes over `feeds` (ONNX Runtime's calibrators),
    saved as ONNX Runtime's calibration cache (`quantize_static(calibration_cache_path=...)` reads it back).

    Called directly rather than through quantize_static so that the entropy calibrator gets a real histogram:
    quantize_static leaves it at 128 bins for 128 quantized levels, which makes entropy equal to min-max.
    """
    from onnxruntime.quantization import save_tensors_data
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    kind = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[method]
    extra = {
        "minmax": {},
        "entropy": {"num_bins": 2048, "num_quantized_bins": 128},
        "percentile": {"num_bins": 2048, "percentile": 99.999},
    }[method]
    with tempfile.TemporaryDirectory(dir=cache.parent) as tmp:
        calibrator = create_calibrator(
            Path(src),
            list(STATIC_OP_TYPES),
            augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=kind,
            use_external_data_format=True,
            extra_options=extra,
        )
        collect_in_chunks(calibrator, feeds)
        save_tensors_data(calibrator.compute_data(), cache)
        del calibrator


CALIBRATION_CHUNK = 8


def collect_in_chunks(calibrator, feeds: list[dict]) -> None:
    """Feed the calibrator a few inputs at a time: its intermediate outputs (every calibrated tensor of every
    input) stay bounded, and each call merges into the running ranges / histograms. (ONNX Runtime 1.32's own
    bound, `max_intermediate_outputs`, drops the collected outputs without merging them.)"""
    from .calibration import feed_reader

    for start in range(0, len(feeds), CALIBRATION_CHUNK):
        calibrator.collect_data(feed_reader(feeds[start : start + CALIBRATION_CHUNK]))


def quantize_static_int8(
    src: Path, dst: Path, feeds: list[dict], opts: QuantOptions, cache: Path | None = None
) -> dict:
    """QDQ static int8: weights int8, activations uint8 with ranges calibrated on `feeds` (once per `cache`)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[opts.calibration_method]
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        cache = cache or Path(tmp) / "calibration.json"
        if not cache.is_file():
            calibrate_ranges(src, feeds, opts.calibration_method, cache)
        with quiet_ort_quantization():
            quantize_static(
                src,
                dst,
                None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(STATIC_OP_TYPES),
                per_channel=opts.per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(opts.exclude),
                calibrate_method=method,
                use_external_data_format=_large(src),
                calibration_cache_path=cache,
                # 7-bit weights by default, as ONNX Runtime advises for CPUs without VNNI: their u8 x s8 kernels
                # add pairs of products in int16 (AVX2's vpmaddubsw), which saturate with full-range weights. On an
                # AVX2-only AMD EPYC the tiny SD3 MM-EDiT transformer fell to 24.6 dB at int8-static (gate 25) and
                # the int8-dynamic chunked transformer to 24.0 dB; with reduce_range both pass on every CPU. Where
                # the kernels accumulate in int32 (VNNI, ARM's sdot) full-range weights gain 2-5 dB.
                reduce_range=not opts.full_range_weights,
            )
    return {
        "method": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "weights": "int8, symmetric",
        "weight_range_bits": 8 if opts.full_range_weights else 7,
        "activations": "uint8, calibrated ranges",
        "op_types": list(STATIC_OP_TYPES),
        "calibration_method": opts.calibration_method,
    }


# Weight-only precisions: MatMulNBits bits, block size along K, and whether the blocks are symmetric (no zero
# point). int8 keeps ONNX Runtime's default block (128). int4: blocks of 32 with a zero point, chosen by
# scripts/bench_int4.py (docs/quantization.md: on the shapes transformer, 32 asymmetric is the best PSNR per byte).
WEIGHT_ONLY = {"int8-weights": (8, 128, True), "int4-weights": (4, 32, False)}
WEIGHT_ONLY_ALGORITHMS = ("rtn", "hqq")  # round-to-nearest; HQQ (half-quadratic, fits the zero points; 4 bits)


def quantize_weights(
    src: Path,
    dst: Path,
    opts: QuantOptions,
    precision: str = "int8-weights",
    block_size: int | None = None,
    algorithm: str = "rtn",
    keep_8bit=(),
    symmetric: bool | None = None,
) -> dict:
    """Weight-only: `MatMulNBits` holds the weights of every constant-weight MatMul in blocks along K (each block with
    its own scale, and for int4 a zero point), dequantizes them and computes in fp32 (accuracy_level unset). Conv
    weights are stored int8 per output channel (`int8_conv_weights`: MatMulNBits has no Conv form). `keep_8bit`
    names MatMuls that get 8 bits in an int4 model (the sensitivity pass picks the worst ones). Block size, symmetry
    and algorithm default to the precision's measured choice (WEIGHT_ONLY); scripts/bench_int4.py varies them."""
    from onnxruntime.quantization import QuantFormat

    nbits = _import_matmul_nbits_quantizer()
    bits, default_block, default_symmetric = WEIGHT_ONLY[precision]
    block = block_size or default_block
    symmetric = default_symmetric if symmetric is None else symmetric
    # MatMul only. Embedding tables (Gather) stay fp32: ONNX Runtime 1.32's 4-bit Gather (GatherBlockQuantized)
    # raises the graph's ONNX opset past 17, which our exported ReduceMean / Split nodes are not valid in.
    op_types = ("MatMul",)
    if algorithm == "hqq":
        algo = nbits.HQQWeightOnlyQuantConfig(block_size=block, bits=bits, op_types_to_quantize=op_types)
    else:
        algo = nbits.DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=symmetric, bits=bits, op_types_to_quantize=op_types
        )
    keep = _unfused_names(keep_8bit)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        unfused = Path(tmp) / "unfused.onnx"
        changed = prepare_weight_only(src, unfused, opts.exclude)
        model = load_model(unfused)
        with quiet_ort_quantization():
            quantizer = nbits.MatMulNBitsQuantizer(
                model,
                bits=bits,
                block_size=block,
                is_symmetric=symmetric,
                nodes_to_exclude=_unfused_names(opts.exclude) + keep,
                quant_format=QuantFormat.QOperator,
                op_types_to_quantize=op_types,
                algo_config=algo,
            )
            quantizer.process()
            model = quantizer.model.model
            if keep:  # the only constant-weight MatMuls still float, apart from the excluded ones: 8 bits for them
                quantizer = nbits.MatMulNBitsQuantizer(
                    model,
                    bits=8,
                    block_size=WEIGHT_ONLY["int8-weights"][1],
                    is_symmetric=True,
                    nodes_to_exclude=_unfused_names(opts.exclude),
                    quant_format=QuantFormat.QOperator,
                    op_types_to_quantize=("MatMul",),
                )
                quantizer.process()
                model = quantizer.model.model
        save_model(model, dst)
    zero_point = "symmetric" if symmetric and algorithm == "rtn" else "asymmetric (zero point per block)"
    return {
        "method": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "format": f"QOperator (com.microsoft MatMulNBits, bits={bits})",
        "algorithm": algorithm,
        "block_size": block,
        "weights": f"int{bits}, {zero_point}, blocks of {block} along K per output channel (Conv: int8 per "
        "output channel through DequantizeLinear)",
        "activations": "fp32 (weights dequantized, fp32 compute)",
        "op_types": ["MatMul", "Conv"],
        "kept_8bit": sorted(keep_8bit),
        **changed,
    }


def _unfused_names(names) -> list[str]:
    """Exclusion lists name the exported Gemm nodes; after `unfuse_gemm` their MatMul carries a suffix."""
    out = []
    for n in names or []:
        out += [n, f"{n}__MatMul"]
    return out


def _large(path: Path) -> bool:
    path = Path(path)
    return (path.parent / external_data_file(path)).is_file() or path.stat().st_size > EXTERNAL_DATA_THRESHOLD


def weighted_nodes(model: onnx.ModelProto, op_types=STATIC_OP_TYPES) -> list[str]:
    """Nodes with a constant (initializer) weight input: what int8 quantization changes."""
    inits = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in op_types and len(n.input) > 1 and n.input[1] in inits]


def node_groups(names: list[str]) -> dict[str, list[str]]:
    """Group node names by module: the path up to the first indexed module (`transformer_blocks.3`, `block.0`) plus
    one more level (`/transformer/transformer_blocks.3/attn1`), else the path without its last two segments."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.strip("/").split("/")
        key = None
        for i, part in enumerate(parts[:-1]):
            if re.search(r"\.\d+$", part):
                key = "/".join(parts[: min(i + 2, len(parts) - 1)])
                break
        if key is None:
            key = "/".join(parts[: max(len(parts) - 2, 1)])
        groups.setdefault("/" + key, []).append(name)
    return groups
