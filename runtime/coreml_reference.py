"""A numpy reference executor for Core ML ML programs (`.mlpackage`): numeric validation where Core ML cannot run.

Core ML executes only on Apple platforms. To check an exported program on Linux we read the saved package
(`Data/com.apple.CoreML/model.mlmodel`, a protobuf, and `weights/weight.bin`, the MIL blob file) and evaluate
its operations one by one in numpy, following the MIL op definitions of coremltools
(`coremltools/converters/mil/mil/ops/defs/`).

Arithmetic model (what "in the dtype the program declares" means here):
- Every op computes from its inputs in float32 (float64 for nothing) and its result is rounded to the dtype the
  program declares for that output. An fp16 program therefore stores every intermediate tensor in fp16: a value
  beyond 65 504 becomes inf exactly where a Core ML fp16 tensor would, and every rounding of an op's output is
  the fp16 rounding. Elementwise +, -, *, / and sqrt computed in fp32 and rounded once to fp16 are bit-identical
  to native fp16 arithmetic (fp32 has more than twice fp16's precision plus two bits).
- Reductions inside one op (matmul, linear, conv, reduce_*, softmax, layer_norm) accumulate in float32 and round
  the result once. numpy's own float16 matmul does the same (it accumulates in float); Apple's GPU also
  accumulates fp16 matrix products in fp32. The Neural Engine's accumulator is not documented: a partial sum that
  overflows inside one reduction but whose final result fits in fp16 is not caught here. Every overflow of an
  op's output (e.g. an unnormalised sum over tokens) is caught.
- Compressed weights (constexpr_* ops) are expanded as coremltools' own `decompress` functions do: integer data
  cast to float, offset subtracted, multiplied by the scale in float32, rounded to the declared dtype.

No torch and no `coremltools` package import: importing coremltools imports torch (seconds, and the runtime must
stay torch-free). Only coremltools' generated protobuf modules are loaded, under a private package name.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import UserError
from .io_specs import as_specs, check_inputs

MODEL_FILE = Path("Data/com.apple.CoreML/model.mlmodel")
WEIGHTS_PREFIX = "@model_path/"
_BLOB_SENTINEL = 0xDEADBEEF
_PROTO_ALIAS = "_edit_mobile_coreml_proto"


def _proto():
    """coremltools' generated protobuf modules (Model_pb2, MIL_pb2) without importing coremltools itself."""
    if "coremltools.proto.Model_pb2" in sys.modules:  # coremltools already imported: share its descriptors
        return sys.modules["coremltools.proto.Model_pb2"], sys.modules["coremltools.proto.MIL_pb2"]
    if _PROTO_ALIAS + ".Model_pb2" not in sys.modules:
        spec = importlib.util.find_spec("coremltools")
        if spec is None or not spec.submodule_search_locations:
            raise UserError("reading Core ML packages needs coremltools (pip install 'edit-mobile[coreml]')")
        package = types.ModuleType(_PROTO_ALIAS)
        package.__path__ = [os.path.join(spec.submodule_search_locations[0], "proto")]
        sys.modules[_PROTO_ALIAS] = package
    return (importlib.import_module(_PROTO_ALIAS + ".Model_pb2"), importlib.import_module(_PROTO_ALIAS + ".MIL_pb2"))


# MIL proto DataType name -> (numpy dtype, bits per element in packed form)
_DTYPES = {
    "BOOL": (np.bool_, 8),
    "FLOAT16": (np.float16, 16),
    "FLOAT32": (np.float32, 32),
    "FLOAT64": (np.float64, 64),
    "INT8": (np.int8, 8),
    "INT16": (np.int16, 16),
    "INT32": (np.int32, 32),
    "INT64": (np.int64, 64),
    "UINT8": (np.uint8, 8),
    "UINT16": (np.uint16, 16),
    "UINT32": (np.uint32, 32),
    "UINT64": (np.uint64, 64),
    "INT4": (np.int8, 4),
    "UINT1": (np.uint8, 1),
    "UINT2": (np.uint8, 2),
    "UINT3": (np.uint8, 3),
    "UINT4": (np.uint8, 4),
    "UINT6": (np.uint8, 6),
}
# MIL dtype strings used by cast / quantize (`dtype="fp16"`) -> numpy
_DTYPE_STRINGS = {
    "fp16": np.float16,
    "fp32": np.float32,
    "fp64": np.float64,
    "int8": np.int8,
    "uint8": np.uint8,
    "int16": np.int16,
    "uint16": np.uint16,
    "int32": np.int32,
    "uint32": np.uint32,
    "int64": np.int64,
    "bool": np.bool_,
}


def unpack_bits(packed: np.ndarray, nbits: int, count: int, signed: bool) -> np.ndarray:
    """Sub-byte elements packed from the least significant bit upward (coremltools' pack_elements_into_bits)."""
    bits = np.unpackbits(packed.view(np.uint8), bitorder="little")[: count * nbits].reshape(count, nbits)
    values = (bits.astype(np.int32) << np.arange(nbits, dtype=np.int32)).sum(axis=1)
    if signed:
        values = np.where(values >= 1 << (nbits - 1), values - (1 << nbits), values)
        return values.astype(np.int8)
    return values.astype(np.uint8)


class _Weights:
    """weight.bin (MIL blob storage v2): 64-byte header, then per blob 64 bytes of metadata and its data."""

    def __init__(self, root: Path, where: str):
        self.root, self.where, self._maps = root, where, {}

    def _map(self, file_name: str) -> np.ndarray:
        if not file_name.startswith(WEIGHTS_PREFIX):
            raise UserError(f"{self.where}: weight file {file_name!r} is not inside the package")
        rel = file_name[len(WEIGHTS_PREFIX) :]
        path = (self.root / "Data/com.apple.CoreML" / rel).resolve()
        if not path.is_relative_to(self.root.resolve()) or not path.is_file():
            raise UserError(f"corrupted .mlpackage {self.root}: weight file {rel} is missing")
        if rel not in self._maps:
            self._maps[rel] = (
                np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
            )
        return self._maps[rel]

    def read(self, file_name: str, offset: int, dtype_name: str, shape: tuple[int, ...]) -> np.ndarray:
        data = self._map(file_name)
        dtype, nbits = _DTYPES[dtype_name]
        count = int(np.prod(shape, dtype=np.int64))
        if offset + 64 > data.size:
            raise UserError(f"corrupted .mlpackage {self.root}: weight offset {offset} beyond the weight file")
        sentinel, _blob_dtype, size, start = np.frombuffer(data[offset : offset + 24].tobytes(), "<u4,<u4,<u8,<u8")[0]
        expected = (count * nbits + 7) // 8
        if sentinel != _BLOB_SENTINEL or size != expected or start + size > data.size:
            raise UserError(f"corrupted .mlpackage {self.root}: bad weight blob at offset {offset}")
        raw = np.asarray(data[start : start + size])
        if nbits < 8:
            return unpack_bits(raw, nbits, count, dtype_name == "INT4").reshape(shape)
        return raw.view(np.dtype(dtype).newbyteorder("<")).astype(dtype, copy=True).reshape(shape)


def _tensor_type(value_type, where: str) -> tuple[str, tuple[int, ...]]:
    kind = value_type.WhichOneof("type")
    if kind != "tensorType":
        raise UserError(f"{where}: value type {kind!r} is not supported by the reference executor")
    t = value_type.tensorType
    shape = []
    for d in t.dimensions:
        if d.WhichOneof("dimension") != "constant":
            raise UserError(f"{where}: dynamic shapes are not supported by the reference executor")
        shape.append(int(d.constant.size))
    return _dtype_name(t.dataType), tuple(shape)


_DTYPE_NAMES: dict[int, str] = {}


def _dtype_name(code: int) -> str:
    if not _DTYPE_NAMES:
        _, mil = _proto()
        _DTYPE_NAMES.update({v: k for k, v in mil.DataType.items()})
    name = _DTYPE_NAMES.get(code, str(code))
    if name not in _DTYPES and name != "STRING":
        raise UserError(f"Core ML data type {name} is not supported by the reference executor")
    return name


def _immediate(value, dtype_name: str, shape: tuple[int, ...]):
    t = value.immediateValue.tensor
    field = t.WhichOneof("value")
    if dtype_name == "STRING":
        strings = [s.decode() if isinstance(s, bytes) else s for s in t.strings.values]
        return strings[0] if shape == () else np.array(strings, dtype=object).reshape(shape)
    dtype, nbits = _DTYPES[dtype_name]
    count = int(np.prod(shape, dtype=np.int64))
    if field == "bytes":
        raw = np.frombuffer(t.bytes.values, np.uint8)
        arr = unpack_bits(raw, nbits, count, dtype_name == "INT4") if nbits < 8 else raw.view(dtype)[:count]
    elif field is None:
        arr = np.zeros(0, dtype)
    else:
        arr = np.array(getattr(t, field).values, dtype=dtype)
    return arr.astype(dtype, copy=True).reshape(shape)


class CoreMLReferenceProgram:
    """One `.mlpackage` read from disk; `run(inputs)` evaluates its `main` function in numpy."""

    def __init__(self, path: str | Path, component: str | None = None):
        self.path = Path(path)
        self.component = component or self.path.name
        model_pb2, _ = _proto()
        model_file = self.path / MODEL_FILE
        if not self.path.is_dir() or not model_file.is_file():
            raise UserError(f"corrupted .mlpackage {self.path}: {MODEL_FILE} is missing")
        self.spec = model_pb2.Model()
        try:
            self.spec.ParseFromString(model_file.read_bytes())
        except Exception as e:  # google.protobuf.message.DecodeError and friends
            raise UserError(f"corrupted .mlpackage {self.path}: model.mlmodel does not parse ({e})") from None
        if self.spec.WhichOneof("Type") != "mlProgram":
            raise UserError(f"{self.path} is not an ML program (it holds a {self.spec.WhichOneof('Type')!r} model)")
        functions = self.spec.mlProgram.functions
        if "main" not in functions:
            raise UserError(f"corrupted .mlpackage {self.path}: the program has no main function")
        fn = functions["main"]
        self.opset = fn.opset
        if fn.opset not in fn.block_specializations:
            raise UserError(f"corrupted .mlpackage {self.path}: no block for opset {fn.opset}")
        self.block = fn.block_specializations[fn.opset]
        where = f"{self.component}"
        self.inputs = {v.name: _tensor_type(v.type, f"{where} input {v.name}") for v in fn.inputs}
        self.output_names = list(self.block.outputs)
        self.weights = _Weights(self.path, f"{self.path}")
        self.ops = list(self.block.operations)
        unknown = sorted({op.type for op in self.ops if op.type not in OPS})
        if unknown:
            raise UserError(f"Core ML reference executor does not implement op {unknown[0]!r} (in {self.component})")
        for op in self.ops:
            if len(op.blocks):
                raise UserError(
                    f"Core ML reference executor does not implement op {op.type!r} with nested blocks "
                    f"(in {self.component})"
                )
        # Last op index that reads each value, so that intermediate tensors are freed as soon as possible.
        self._last_use: dict[str, int] = {}
        for i, op in enumerate(self.ops):
            for arg in op.inputs.values():
                for b in arg.arguments:
                    if b.WhichOneof("binding") == "name":
                        self._last_use[b.name] = i
        for name in self.output_names:
            self._last_use[name] = len(self.ops)
        self._constants: dict | None = None

    # --- description -------------------------------------------------------------------------------------------
    @property
    def compute_precision(self) -> str:
        """ "fp16" when any op produces a float16 tensor, else "fp32"."""
        for op in self.ops:
            for out in op.outputs:
                if (
                    out.type.WhichOneof("type") == "tensorType"
                    and _DTYPE_NAMES.get(out.type.tensorType.dataType) == "FLOAT16"
                ):
                    return "fp16"
        return "fp32"

    def op_types(self) -> list[str]:
        return sorted({op.type for op in self.ops})

    def metadata(self) -> dict:
        d = self.spec.description
        return {
            "short_description": d.metadata.shortDescription,
            "version": d.metadata.versionString,
            "author": d.metadata.author,
            "user_defined": dict(d.metadata.userDefined),
        }

    # --- values ------------------------------------------------------------------------------------------------
    def _value(self, value, where: str):
        dtype_name, shape = _tensor_type(value.type, where)
        kind = value.WhichOneof("value")
        if kind == "immediateValue":
            return _immediate(value, dtype_name, shape)
        if kind == "blobFileValue":
            return self.weights.read(value.blobFileValue.fileName, int(value.blobFileValue.offset), dtype_name, shape)
        raise UserError(f"corrupted .mlpackage {self.path}: {where} has no value")

    def constants(self) -> dict[str, np.ndarray]:
        """Every constant the program materialises (const and constexpr_* ops), by output name, expanded."""
        return {k: v for k, v in self._constant_values().items() if isinstance(v, np.ndarray)}

    def _constant_values(self) -> dict:
        """const / constexpr_* outputs, read and expanded once (they do not depend on the inputs)."""
        if self._constants is None:
            env: dict = {}
            for op in self.ops:
                if _is_constant(op):
                    self._execute(op, env)
            self._constants = env
        return self._constants

    # --- execution ---------------------------------------------------------------------------------------------
    def _params(self, op, env) -> dict:
        params = {}
        for key, value in op.attributes.items():
            if key != "name":
                params[key] = self._value(value, f"{self.component} op {op.type} attribute {key}")
        for key, arg in op.inputs.items():
            vals = []
            for b in arg.arguments:
                if b.WhichOneof("binding") == "name":
                    if b.name not in env:
                        raise UserError(f"corrupted .mlpackage {self.path}: op {op.type} reads undefined {b.name!r}")
                    vals.append(env[b.name])
                else:
                    vals.append(self._value(b.value, f"{self.component} op {op.type} input {key}"))
            params[key] = vals if len(vals) != 1 or (op.type, key) in _VARIADIC else vals[0]
        return params

    def _execute(self, op, env) -> None:
        params = self._params(op, env)
        declared = [_tensor_type(o.type, f"{self.component} op {op.type} output {o.name}") for o in op.outputs]
        try:
            result = OPS[op.type](params, declared)
        except UserError:
            raise
        except Exception as e:
            raise RuntimeError(f"{self.component}: op {op.type} ({op.outputs[0].name}) failed: {e!r}") from e
        results = list(result) if isinstance(result, (list, tuple)) else [result]
        if len(results) != len(op.outputs):
            raise RuntimeError(
                f"{self.component}: op {op.type} produced {len(results)} outputs, "
                f"the program declares {len(op.outputs)}"
            )
        for out, value, (dtype_name, shape) in zip(op.outputs, results, declared):
            if dtype_name != "STRING":
                value = np.asarray(value)
                if value.shape != shape:
                    raise RuntimeError(
                        f"{self.component}: op {op.type} ({out.name}) gave shape {value.shape}, "
                        f"the program declares {shape}"
                    )
                value = value.astype(_DTYPES[dtype_name][0], copy=False)
            env[out.name] = value

    def run(
        self, inputs: dict[str, np.ndarray], observer: Callable[[str, np.ndarray], None] | None = None
    ) -> dict[str, np.ndarray]:
        """Evaluate `main`. Inputs are cast to the program's declared input dtypes (int64 token ids -> int32).

        `observer(name, value)` is called with every non-constant op output (calibration statistics)."""
        # fp16 overflow to inf (and 0 * inf) is what this executor is for: it shows in the outputs, which validation
        # checks for non-finite values, so numpy's floating-point warnings are silenced rather than printed per op.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return self._run(inputs, observer)

    def _run(self, inputs, observer) -> dict[str, np.ndarray]:
        env: dict = {}
        for name, (dtype_name, shape) in self.inputs.items():
            if name not in inputs:
                raise ValueError(f"{self.component}: missing input {name!r}")
            a = np.asarray(inputs[name])
            if a.shape != shape:
                raise ValueError(f"{self.component}: input {name!r} has shape {a.shape}, the program wants {shape}")
            env[name] = a.astype(_DTYPES[dtype_name][0])
        constants = self._constant_values()
        for i, op in enumerate(self.ops):
            if _is_constant(op):
                for out in op.outputs:
                    env[out.name] = constants[out.name]
                continue
            self._execute(op, env)
            if observer is not None:
                for out in op.outputs:
                    observer(out.name, env[out.name])
            for arg in op.inputs.values():  # free what no later op reads
                for b in arg.arguments:
                    if b.WhichOneof("binding") == "name" and self._last_use.get(b.name) == i:
                        env.pop(b.name, None)
        return {name: env[name] for name in self.output_names}


def _is_constant(op) -> bool:
    return op.type == "const" or op.type.startswith("constexpr_")


def load_program(path: str | Path, component: str | None = None) -> CoreMLReferenceProgram:
    return CoreMLReferenceProgram(path, component)


# ------------------------------------------------------------------------------------------------------------------
# Op semantics (MIL, coremltools/converters/mil/mil/ops/defs). Each takes (params, declared outputs) and returns
# one array or a tuple; the caller rounds every result to the declared dtype and checks the declared shape.

_VARIADIC = {("concat", "values"), ("stack", "values")}  # inputs that take a list of tensors


def _f(x) -> np.ndarray:
    """Compute dtype: float16 inputs are widened to float32 (see the module docstring)."""
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float16 else x


def _scalar(x, default=None):
    if x is None:
        return default
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.reshape(-1)[0].item()


def _ints(x) -> list[int]:
    return [int(v) for v in np.asarray(x).reshape(-1)]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _binary(fn):
    return lambda p, d: fn(_f(p["x"]), _f(p["y"]))


def _unary(fn):
    return lambda p, d: fn(_f(p["x"]))


def _erf_approx(v) -> np.ndarray:
    """Abramowitz & Stegun 7.1.26 in float64: |error| < 1.5e-7."""
    v = np.asarray(v, np.float64)
    s, a = np.sign(v), np.abs(v)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return s * (1.0 - poly * np.exp(-a * a))


@functools.cache
def _erf_function() -> Callable:
    try:
        from scipy.special import erf  # exact to float precision where scipy is installed
    except ImportError:
        return _erf_approx
    return erf


def _erf(x: np.ndarray) -> np.ndarray:
    return np.asarray(_erf_function()(x), dtype=x.dtype)


def _gelu(p, d):
    x = _f(p["x"])
    mode = p.get("mode", "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0))))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2.0 / math.pi)) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(-1.702 * x))
    raise UserError(f"gelu mode {mode!r} is not implemented by the reference executor")


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _reduce(fn):
    def op(p, d):
        x = _f(p["x"])
        axes = p.get("axes")
        axes = None if axes is None else tuple(_axis(a, x.ndim) for a in _ints(axes))
        return fn(x, axis=axes, keepdims=bool(_scalar(p.get("keep_dims"), False)))

    return op


def _arg_reduce(fn):
    def op(p, d):
        x = _f(p["x"])
        axis = _axis(int(_scalar(p.get("axis"), -1)), x.ndim)
        out = fn(x, axis=axis)
        return np.expand_dims(out, axis) if _scalar(p.get("keep_dims"), False) else out

    return op


def _matmul(p, d):
    x, y = _f(p["x"]), _f(p["y"])
    if _scalar(p.get("transpose_x"), False) and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    if _scalar(p.get("transpose_y"), False) and y.ndim > 1:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _linear(p, d):
    x, w = _f(p["x"]), _f(p["weight"])
    y = np.matmul(x, w.T)
    if p.get("bias") is not None:
        y = y + _f(p["bias"])
    return y


def _conv_pads(pad_type: str, pad, kernel, strides, dilations, spatial) -> list[tuple[int, int]]:
    n = len(kernel)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        pad = _ints(pad) if pad is not None else [0] * (2 * n)
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for i in range(n):
            out = -(-spatial[i] // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - spatial[i], 0)
            small, big = total // 2, total - total // 2
            pads.append((big, small) if pad_type == "same_lower" else (small, big))
        return pads
    raise UserError(f"conv pad_type {pad_type!r} is not implemented by the reference executor")


def _conv(p, d):
    """N-d convolution (cross-correlation), groups, strides, dilations, MIL padding modes."""
    x, w = _f(p["x"]), _f(p["weight"])
    n = x.ndim - 2
    strides = _ints(p["strides"]) if p.get("strides") is not None else [1] * n
    dilations = _ints(p["dilations"]) if p.get("dilations") is not None else [1] * n
    groups = int(_scalar(p.get("groups"), 1))
    kernel = list(w.shape[2:])
    pads = _conv_pads(str(p.get("pad_type", "valid")), p.get("pad"), kernel, strides, dilations, x.shape[2:])
    x = np.pad(x, [(0, 0), (0, 0), *pads])
    b, c_in = x.shape[:2]
    c_out = w.shape[0]
    # Sliding windows over the dilated kernel extent, then strided: (B, C, *out, *kernel)
    extent = [(k - 1) * dl + 1 for k, dl in zip(kernel, dilations)]
    win = np.lib.stride_tricks.sliding_window_view(x, extent, axis=tuple(range(2, 2 + n)))
    win = win[
        (
            slice(None),
            slice(None),
            *[slice(None, None, s) for s in strides],
            *[slice(None, None, dl) for dl in dilations],
        )
    ]
    out_sizes = win.shape[2 : 2 + n]
    cg, og = c_in // groups, c_out // groups
    outs = []
    for g in range(groups):
        wg = w[g * og : (g + 1) * og].reshape(og, -1)  # (og, cg * prod(k))
        xg = win[:, g * cg : (g + 1) * cg]  # (B, cg, *out, *k)
        xg = np.moveaxis(xg, 1, 1 + n)  # (B, *out, cg, *k)
        cols = xg.reshape(b, int(np.prod(out_sizes)), -1)
        outs.append(np.matmul(cols, wg.T))  # (B, P, og)
    y = np.concatenate(outs, axis=-1) if groups > 1 else outs[0]
    y = np.moveaxis(y, -1, 1).reshape(b, c_out, *out_sizes)
    if p.get("bias") is not None:
        y = y + _f(p["bias"]).reshape(1, c_out, *([1] * n))
    return y


def _scale_shift(y, p, shape):
    """The normalisations' optional affine part: y * gamma + beta, both broadcast to `shape`."""
    if p.get("gamma") is not None:
        y = y * _f(p["gamma"]).reshape(shape)
    if p.get("beta") is not None:
        y = y + _f(p["beta"]).reshape(shape)
    return y


def _layer_norm(p, d):
    x = _f(p["x"])
    axes = tuple(_axis(a, x.ndim) for a in _ints(p["axes"])) if p.get("axes") is not None else tuple(range(x.ndim))
    eps = np.float32(_scalar(p.get("epsilon"), 1e-5))
    mean = x.mean(axis=axes, keepdims=True)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    return _scale_shift(y, p, shape)


def _instance_norm(p, d):
    x = _f(p["x"])
    axes = tuple(range(2, x.ndim))
    eps = np.float32(_scalar(p.get("epsilon"), 1e-5))
    mean = x.mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(np.square(x - mean).mean(axis=axes, keepdims=True) + eps)
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    return _scale_shift(y, p, shape)


def _batch_norm(p, d):  # per-channel statistics given as constants (axis 1)
    x = _f(p["x"])
    shape = [1, x.shape[1]] + [1] * (x.ndim - 2)
    eps = np.float32(_scalar(p.get("epsilon"), 1e-5))
    y = (x - _f(p["mean"]).reshape(shape)) / np.sqrt(_f(p["variance"]).reshape(shape) + eps)
    return _scale_shift(y, p, shape)


def _reshape(p, d):
    x = np.asarray(p["x"])
    shape = _ints(p["shape"])
    if 0 in shape:  # iOS17: a 0 copies the input dim aligned from the right
        out = list(shape)
        for i in range(len(shape)):
            j = x.ndim - (len(shape) - i)
            if shape[i] == 0:
                out[i] = x.shape[j] if 0 <= j < x.ndim else 1
        shape = out
    return x.reshape(shape)


def _expand_dims(p, d):
    x = np.asarray(p["x"])
    rank = x.ndim + len(_ints(p["axes"]))
    return np.expand_dims(x, tuple(sorted(_axis(a, rank) for a in _ints(p["axes"]))))


def _squeeze(p, d):
    x = np.asarray(p["x"])
    if p.get("axes") is None:
        return np.squeeze(x)
    return np.squeeze(x, tuple(_axis(a, x.ndim) for a in _ints(p["axes"])))


def _concat(p, d):
    values = p["values"] if isinstance(p["values"], list) else [p["values"]]
    axis = _axis(int(_scalar(p["axis"])), np.asarray(values[0]).ndim)
    if _scalar(p.get("interleave"), False):
        stacked = np.stack(values, axis=axis + 1)
        shape = list(np.asarray(values[0]).shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


def _stack(p, d):
    values = p["values"] if isinstance(p["values"], list) else [p["values"]]
    return np.stack(values, axis=_axis(int(_scalar(p["axis"])), np.asarray(values[0]).ndim + 1))


def _split(p, d):
    x = np.asarray(p["x"])
    axis = _axis(int(_scalar(p["axis"])), x.ndim)
    if p.get("split_sizes") is not None:
        bounds = np.cumsum(_ints(p["split_sizes"]))[:-1]
    else:
        bounds = int(_scalar(p["num_splits"]))
    return tuple(np.split(x, bounds, axis=axis))


def _slice_index(p, r: int) -> tuple:
    begin, end = _ints(p["begin"]), _ints(p["end"])
    stride = _ints(p["stride"]) if p.get("stride") is not None else [1] * r
    bm = [bool(v) for v in np.asarray(p["begin_mask"]).reshape(-1)] if p.get("begin_mask") is not None else [False] * r
    em = [bool(v) for v in np.asarray(p["end_mask"]).reshape(-1)] if p.get("end_mask") is not None else [False] * r
    sm = (
        [bool(v) for v in np.asarray(p["squeeze_mask"]).reshape(-1)]
        if p.get("squeeze_mask") is not None
        else [False] * r
    )
    index = []
    for i in range(r):
        if sm[i]:
            index.append(begin[i])
            continue
        b = None if bm[i] else begin[i]
        e = None if em[i] else end[i]
        index.append(slice(b, e, stride[i]))
    return tuple(index)


def _slice_by_index(p, d):
    x = np.asarray(p["x"])
    return x[_slice_index(p, x.ndim)]


def _slice_update(p, d):  # iOS18: x[begin:end:stride, ...] = update, on a copy
    x = _f(p["x"]).copy()
    update = _f(p["update"])
    index = _slice_index(p, x.ndim)
    x[index] = update.reshape(x[index].shape)
    return x


def _slice_by_size(p, d):
    x = np.asarray(p["x"])
    begin, size = _ints(p["begin"]), _ints(p["size"])
    return x[tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))]


def _positive(indices: np.ndarray, dim: int) -> np.ndarray:
    indices = np.asarray(indices).astype(np.int64)
    return np.where(indices < 0, indices + dim, indices)


def _gather(p, d):
    x = np.asarray(p["x"])
    axis = _axis(int(_scalar(p.get("axis"), 0)), x.ndim)
    batch_dims = int(_scalar(p.get("batch_dims"), 0))
    idx = _positive(p["indices"], x.shape[axis])
    if batch_dims == 0:
        return np.take(x, idx, axis=axis)
    lead = x.shape[:batch_dims]
    xs = x.reshape(-1, *x.shape[batch_dims:])
    ids = idx.reshape(-1, *idx.shape[batch_dims:])
    out = np.stack([np.take(a, i, axis=axis - batch_dims) for a, i in zip(xs, ids)])
    return out.reshape(*lead, *out.shape[1:])


def _gather_nd(p, d):
    x = np.asarray(p["x"])
    idx = np.asarray(p["indices"]).astype(np.int64)
    batch_dims = int(_scalar(p.get("batch_dims"), 0))

    def one(a, i):
        k = i.shape[-1]
        i = np.where(i < 0, i + np.array(a.shape[:k]), i)
        return a[tuple(np.moveaxis(i, -1, 0))]

    if batch_dims == 0:
        return one(x, idx)
    lead = x.shape[:batch_dims]
    xs = x.reshape(-1, *x.shape[batch_dims:])
    ids = idx.reshape(-1, *idx.shape[batch_dims:])
    out = np.stack([one(a, i) for a, i in zip(xs, ids)])
    return out.reshape(*lead, *out.shape[1:])


def _gather_along_axis(p, d):
    x = np.asarray(p["x"])
    axis = _axis(int(_scalar(p.get("axis"), 0)), x.ndim)
    return np.take_along_axis(x, _positive(p["indices"], x.shape[axis]), axis=axis)


_SCATTER_MODES = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "div": np.divide,
    "max": np.maximum,
    "min": np.minimum,
}


def _scatter(p, d):
    data = _f(p["data"]).copy()
    axis = _axis(int(_scalar(p.get("axis"), 0)), data.ndim)
    idx = _positive(p["indices"], data.shape[axis])
    updates = _f(p["updates"])
    mode = str(p.get("mode", "update"))
    index = (slice(None),) * axis + (idx,)
    if mode == "update":
        data[index] = updates
    elif mode in _SCATTER_MODES:
        _SCATTER_MODES[mode].at(data, index, updates)
    else:
        raise UserError(f"scatter mode {mode!r} is not implemented by the reference executor")
    return data


def _scatter_along_axis(p, d):
    data = _f(p["data"]).copy()
    axis = _axis(int(_scalar(p.get("axis"), 0)), data.ndim)
    idx = _positive(p["indices"], data.shape[axis])
    mode = str(p.get("mode", "update"))
    if mode != "update":
        raise UserError(f"scatter_along_axis mode {mode!r} is not implemented by the reference executor")
    np.put_along_axis(data, idx, _f(p["updates"]), axis=axis)
    return data


def _pad(p, d):
    x = _f(p["x"])
    pad = _ints(p["pad"])
    n = len(pad) // 2
    widths = [(0, 0)] * (x.ndim - n) + [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    mode = str(p.get("mode", "constant"))
    if mode == "constant":
        return np.pad(x, widths, constant_values=_scalar(p.get("constant_val"), 0.0))
    if mode == "reflect":
        return np.pad(x, widths, mode="reflect")
    if mode == "replicate":
        return np.pad(x, widths, mode="edge")
    raise UserError(f"pad mode {mode!r} is not implemented by the reference executor")


def _upsample_nearest(p, d):
    x = np.asarray(p["x"])
    out_h, out_w = d[0][1][-2:]
    sh = float(_scalar(p.get("scale_factor_height"), 1))
    sw = float(_scalar(p.get("scale_factor_width"), 1))
    rows = np.minimum(np.floor(np.arange(out_h) / sh).astype(np.int64), x.shape[-2] - 1)
    cols = np.minimum(np.floor(np.arange(out_w) / sw).astype(np.int64), x.shape[-1] - 1)
    return x[..., rows, :][..., cols]


def _fill_like(p, d):
    return np.full(np.asarray(p["ref_tensor"]).shape, _scalar(p.get("value"), 0.0), dtype=_DTYPES[d[0][0]][0])


def _fill(p, d):
    return np.full(_ints(p["shape"]), _scalar(p.get("value"), 0.0), dtype=_DTYPES[d[0][0]][0])


def _cast(p, d):
    x = np.asarray(p["x"])
    target = _DTYPE_STRINGS.get(str(p["dtype"]))
    if target is None:
        raise UserError(f"cast to {p['dtype']!r} is not implemented by the reference executor")
    if np.issubdtype(target, np.integer) and np.issubdtype(x.dtype, np.floating):
        x = np.trunc(x)
    return x.astype(target)


def _sdpa(p, d):
    """iOS18 scaled_dot_product_attention: softmax(Q K^T / sqrt(d) + mask) V (a bool mask: True = keep)."""
    q, k, v = _f(p["query"]), _f(p["key"]), _f(p["value"])
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(math.sqrt(q.shape[-1]))
    mask = p.get("attn_mask")
    if mask is not None:
        mask = np.asarray(mask)
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + _f(mask)
    return np.matmul(_softmax(scores, -1), v)


def _broadcast_param(param: np.ndarray, data_shape, axis) -> np.ndarray:
    """Scale / zero point of (de)quantize: a scalar or a vector along `axis`."""
    param = np.asarray(param)
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * len(data_shape)
    shape[_axis(int(axis), len(data_shape))] = param.size
    return param.reshape(shape)


def _quantize(p, d):
    x = np.asarray(p["input"])
    shape = x.shape
    scale = _f(_broadcast_param(p["scale"], shape, _scalar(p.get("axis"))))
    # The quotient is rounded to the input's dtype (fp16 in fp16 programs) before rounding to an integer, then
    # rounded half to even: exactly coremltools' quantize_by_scale_and_zp.
    q = np.around((_f(x) / scale).astype(x.dtype)).astype(np.float32)
    if p.get("zero_point") is not None:
        q = q + _broadcast_param(p["zero_point"], shape, _scalar(p.get("axis"))).astype(np.float32)
    target = _DTYPE_STRINGS[str(p["output_dtype"])]
    info = np.iinfo(target)
    return np.clip(q, info.min, info.max).astype(target)


def _dequantize_values(data, scale, zero_point, axis) -> np.ndarray:
    out = np.asarray(data).astype(np.float32)
    if zero_point is not None:
        out = out - _broadcast_param(zero_point, out.shape, axis).astype(np.float32)
    return out * _broadcast_param(scale, out.shape, axis).astype(np.float32)


def _dequantize(p, d):
    return _dequantize_values(p["input"], p["scale"], p.get("zero_point"), _scalar(p.get("axis")))


def _constexpr_affine_dequantize(p, d):  # iOS16
    return _dequantize_values(p["quantized_data"], p["scale"], p.get("zero_point"), _scalar(p.get("axis"), 0))


def _repeat_blocks(param: np.ndarray, shape) -> np.ndarray:
    for axis, (n, m) in enumerate(zip(shape, param.shape)):
        if n != m:
            param = np.repeat(param, n // m, axis=axis)
    return param


def _constexpr_blockwise_shift_scale(p, d):  # iOS18
    data = np.asarray(p["data"]).astype(np.float32)
    scale = np.asarray(p["scale"])
    if p.get("offset") is not None:
        data = data - _repeat_blocks(np.asarray(p["offset"]).astype(np.float32), data.shape)
    return _repeat_blocks(scale.astype(np.float32), data.shape) * data


def _constexpr_lut_to_dense(p, d):
    lut, indices = np.asarray(p["lut"]), np.asarray(p["indices"])
    if "shape" in p:  # iOS16: a flat LUT, indices packed into uint8, the output shape given
        shape = _ints(p["shape"])
        nbits = int(round(math.log2(lut.size)))
        flat = unpack_bits(indices.astype(np.uint8), nbits, int(np.prod(shape)), False)
        return lut[flat.astype(np.int64)].reshape(shape)
    # iOS18: indices with the output's shape, lut (*blocks, 2^nbits, vector_size)
    vector_axis = p.get("vector_axis")
    vector_size = lut.shape[-1]
    if vector_size > 1:
        axis = _axis(int(_scalar(vector_axis)), indices.ndim)
        indices = np.swapaxes(indices, -1, axis)
        lut = np.swapaxes(lut, -3, axis)
    palettes = lut.shape[-2]
    table = lut.reshape(*lut.shape[:-2], palettes * vector_size)
    table = _repeat_blocks(table, (*indices.shape, palettes * vector_size))
    table = table.reshape(-1, palettes, vector_size)
    out = table[np.arange(table.shape[0]), indices.reshape(-1).astype(np.int64)]
    out = out.reshape(*indices.shape[:-1], indices.shape[-1] * vector_size)
    return np.swapaxes(out, -1, axis) if vector_size > 1 else out.reshape(indices.shape)


def _constexpr_cast(p, d):
    return np.asarray(p["source_val"]).astype(_DTYPE_STRINGS[str(p["output_dtype"])])


def _clip(p, d):
    return np.clip(_f(p["x"]), _scalar(p["alpha"]), _scalar(p["beta"]))


def _band(lo, hi):
    return lambda p, d: np.clip(_f(p["x"]), lo, hi)


OPS: dict[str, Callable] = {
    "const": lambda p, d: p["val"],
    "identity": lambda p, d: np.asarray(p["x"]),
    "cast": _cast,
    # elementwise binary (numpy broadcasting = MIL broadcasting)
    "add": _binary(np.add),
    "sub": _binary(np.subtract),
    "mul": _binary(np.multiply),
    "real_div": _binary(np.divide),
    "floor_div": _binary(np.floor_divide),
    "mod": _binary(np.mod),
    "pow": _binary(np.power),
    "maximum": _binary(np.maximum),
    "minimum": _binary(np.minimum),
    "equal": _binary(np.equal),
    "not_equal": _binary(np.not_equal),
    "greater": _binary(np.greater),
    "greater_equal": _binary(np.greater_equal),
    "less": _binary(np.less),
    "less_equal": _binary(np.less_equal),
    "logical_and": _binary(np.logical_and),
    "logical_or": _binary(np.logical_or),
    "logical_xor": _binary(np.logical_xor),
    "logical_not": _unary(np.logical_not),
    # elementwise unary
    "abs": _unary(np.abs),
    "ceil": _unary(np.ceil),
    "floor": _unary(np.floor),
    "round": _unary(np.round),
    "sign": _unary(np.sign),
    "exp": _unary(np.exp),
    "exp2": _unary(np.exp2),
    "log": _unary(np.log),
    "sqrt": _unary(np.sqrt),
    "square": _unary(np.square),
    "sin": _unary(np.sin),
    "cos": _unary(np.cos),
    "tan": _unary(np.tan),
    "tanh": _unary(np.tanh),
    "erf": _unary(_erf),
    "rsqrt": lambda p, d: 1.0 / np.sqrt(_f(p["x"]) + np.float32(_scalar(p.get("epsilon"), 1e-12))),
    "inverse": lambda p, d: 1.0 / (_f(p["x"]) + np.float32(_scalar(p.get("epsilon"), 1e-4))),
    "clip": _clip,
    # activations
    "relu": _unary(lambda x: np.maximum(x, 0)),
    "relu6": _band(0, 6),
    "sigmoid": _unary(lambda x: 1.0 / (1.0 + np.exp(-x))),
    "silu": _unary(lambda x: x / (1.0 + np.exp(-x))),
    "gelu": _gelu,
    "leaky_relu": lambda p, d: (lambda x, a: np.where(x >= 0, x, a * x))(
        _f(p["x"]), np.float32(_scalar(p.get("alpha"), 0.01))
    ),
    "softplus": _unary(lambda x: np.logaddexp(0, x)),
    "softmax": lambda p, d: _softmax(_f(p["x"]), int(_scalar(p.get("axis"), -1))),
    # linear algebra
    "linear": _linear,
    "matmul": _matmul,
    "conv": _conv,
    "scaled_dot_product_attention": _sdpa,
    # normalisation
    "layer_norm": _layer_norm,
    "instance_norm": _instance_norm,
    "batch_norm": _batch_norm,
    # reductions
    "reduce_mean": _reduce(np.mean),
    "reduce_sum": _reduce(np.sum),
    "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "reduce_prod": _reduce(np.prod),
    "reduce_sum_square": _reduce(lambda x, **k: np.sum(np.square(x), **k)),
    "reduce_l2_norm": _reduce(lambda x, **k: np.sqrt(np.sum(np.square(x), **k))),
    "reduce_log_sum_exp": _reduce(lambda x, **k: np.log(np.sum(np.exp(x), **k))),
    "reduce_argmax": _arg_reduce(np.argmax),
    "reduce_argmin": _arg_reduce(np.argmin),
    # shapes and data movement
    "reshape": _reshape,
    "transpose": lambda p, d: np.transpose(np.asarray(p["x"]), _ints(p["perm"])),
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "concat": _concat,
    "stack": _stack,
    "split": _split,
    "slice_by_index": _slice_by_index,
    "slice_by_size": _slice_by_size,
    "slice_update": _slice_update,
    "tile": lambda p, d: np.tile(np.asarray(p["x"]), _ints(p["reps"])),
    "pad": _pad,
    "upsample_nearest_neighbor": _upsample_nearest,
    "gather": _gather,
    "gather_nd": _gather_nd,
    "gather_along_axis": _gather_along_axis,
    "scatter": _scatter,
    "scatter_along_axis": _scatter_along_axis,
    "select": lambda p, d: np.where(np.asarray(p["cond"]).astype(bool), _f(p["a"]), _f(p["b"])),
    "fill": _fill,
    "fill_like": _fill_like,
    "shape": lambda p, d: np.array(np.asarray(p["x"]).shape, dtype=np.int32),
    # quantisation and compressed weights
    "quantize": _quantize,
    "dequantize": _dequantize,
    "constexpr_affine_dequantize": _constexpr_affine_dequantize,
    "constexpr_blockwise_shift_scale": _constexpr_blockwise_shift_scale,
    "constexpr_lut_to_dense": _constexpr_lut_to_dense,
    "constexpr_cast": _constexpr_cast,
}


# ------------------------------------------------------------------------------------------------------------------
# Backends (runtime/backends.py's interface: run(inputs) -> outputs, inputs checked against the manifest)


def _check_mlpackage(model_path: Path) -> None:
    if model_path.suffix != ".mlpackage":
        raise UserError(
            f"{model_path} is not a Core ML model (.mlpackage): Core ML backends need a package "
            f"exported with --target coreml"
        )


class CoreMLReferenceBackend:
    """`--backend coreml-reference`: the saved ML program executed by the numpy reference executor (slow, exact
    to the program's declared dtypes; for checking on machines without Core ML)."""

    def __init__(self, model_path: str | Path, input_specs, output_names: list[str]):
        self.model_path = Path(model_path)
        _check_mlpackage(self.model_path)
        self.input_specs = as_specs(input_specs)
        self.output_names = list(output_names)
        self.program = CoreMLReferenceProgram(self.model_path, component=self.model_path.parent.name)
        if set(self.program.inputs) != {s.name for s in self.input_specs} or not set(self.output_names) <= set(
            self.program.output_names
        ):
            raise UserError(
                f"{self.model_path}: the program's inputs {sorted(self.program.inputs)} / outputs "
                f"{self.program.output_names} do not match the manifest"
            )

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(inputs, self.input_specs, where=str(self.model_path))
        out = self.program.run(inputs)
        return {name: out[name] for name in self.output_names}


class CoreMLBackend:
    """`--backend coreml`: Core ML itself (macOS only), through coremltools' MLModel.predict."""

    def __init__(self, model_path: str | Path, input_specs, output_names: list[str], compute_units: str = "ALL"):
        self.model_path = Path(model_path)
        _check_mlpackage(self.model_path)
        if sys.platform != "darwin":
            raise UserError(
                "Core ML prediction needs macOS; use --backend coreml-reference to execute the program "
                "with the numpy reference executor"
            )
        import coremltools as ct  # imports torch too; only here, on macOS

        self.input_specs = as_specs(input_specs)
        self.output_names = list(output_names)
        try:
            units = ct.ComputeUnit[compute_units]
        except KeyError:
            raise UserError(
                f"unknown Core ML compute units {compute_units!r} "
                f"(choose from {', '.join(u.name for u in ct.ComputeUnit)})"
            ) from None
        self.model = ct.models.MLModel(str(self.model_path), compute_units=units)
        codes = {65568: np.float32, 65552: np.float16, 131104: np.int32}  # ArrayFeatureType.ArrayDataType
        self._dtypes = {
            i.name: codes.get(i.type.multiArrayType.dataType, np.float32)
            for i in self.model.get_spec().description.input
        }

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(inputs, self.input_specs, where=str(self.model_path))
        out = self.model.predict({k: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in inputs.items()})
        return {name: np.asarray(out[name]) for name in self.output_names}
