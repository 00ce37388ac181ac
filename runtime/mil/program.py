"""`MILProgram`: one saved ML program (`.mlpackage`) read from disk, checked, and run op by op in numpy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import UserError
from .dtypes import DTYPES
from .ops import OPS, VARIADIC
from .proto import proto_modules
from .storage import WeightFile, immediate, tensor_type

MODEL_FILE = Path("Data/com.apple.CoreML/model.mlmodel")


class MILProgram:
    """One `.mlpackage` read from disk; `run(inputs)` evaluates one of its functions in numpy: `function`, or the
    program's default (`main`, or the default function of a multi-function program)."""

    def __init__(self, path: str | Path, component: str | None = None, function: str | None = None):
        self.path = Path(path)
        self.component = component or self.path.name
        model_pb2, _ = proto_modules()
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
        self.function = function or self.spec.description.defaultFunctionName or "main"
        if self.function not in functions:
            raise UserError(
                f"{self.path}: the program has no function {self.function!r} (it has {', '.join(sorted(functions))})"
            )
        fn = functions[self.function]
        self.opset = fn.opset
        if fn.opset not in fn.block_specializations:
            raise UserError(f"corrupted .mlpackage {self.path}: no block for opset {fn.opset}")
        self.block = fn.block_specializations[fn.opset]
        where = f"{self.component}"
        self.inputs = {v.name: tensor_type(v.type, f"{where} input {v.name}") for v in fn.inputs}
        self.output_names = list(self.block.outputs)
        self.weights = WeightFile(self.path, f"{self.path}")
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
        _, mil = proto_modules()
        fp16 = mil.DataType.Value("FLOAT16")
        for op in self.ops:
            for out in op.outputs:
                if out.type.WhichOneof("type") == "tensorType" and out.type.tensorType.dataType == fp16:
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
        dtype_name, shape = tensor_type(value.type, where)
        kind = value.WhichOneof("value")
        if kind == "immediateValue":
            return immediate(value, dtype_name, shape)
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
            params[key] = vals if len(vals) != 1 or (op.type, key) in VARIADIC else vals[0]
        return params

    def _execute(self, op, env) -> None:
        params = self._params(op, env)
        declared = [tensor_type(o.type, f"{self.component} op {op.type} output {o.name}") for o in op.outputs]
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
                value = value.astype(DTYPES[dtype_name][0], copy=False)
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
            env[name] = a.astype(DTYPES[dtype_name][0])
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


def load_program(path: str | Path, component: str | None = None) -> MILProgram:
    return MILProgram(path, component)
