"""Inference backends behind one interface: `run(inputs: dict[str, ndarray]) -> dict[str, ndarray]`.

Every backend checks its inputs against the manifest's static specs (names, shapes, dtypes) before running, so a
wrong call fails with a message naming the input instead of deep inside the runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Protocol

import numpy as np

from .errors import UserError
from .package import Package, TensorSpec

BACKENDS = ("ort", "coreml", "coreml-reference")

# Manifest dtype names (numpy names, the short forms used in docs/package.md, ONNX type strings) -> numpy dtype.
_DTYPES = {
    "f32": np.float32, "float": np.float32, "float32": np.float32, "tensor(float)": np.float32,
    "f16": np.float16, "half": np.float16, "float16": np.float16, "tensor(float16)": np.float16,
    "f64": np.float64, "double": np.float64, "float64": np.float64, "tensor(double)": np.float64,
    "i64": np.int64, "int64": np.int64, "tensor(int64)": np.int64,
    "i32": np.int32, "int32": np.int32, "tensor(int32)": np.int32,
    "bool": np.bool_, "tensor(bool)": np.bool_,
}

_OPT_LEVELS = ("disable", "basic", "extended", "all")


def to_numpy_dtype(name: str) -> np.dtype:
    """Numpy dtype of a manifest dtype name ("float32", "f32", "int64", "tensor(float)", ...)."""
    try:
        return np.dtype(_DTYPES.get(str(name).lower()) or name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r} in the manifest") from None


def _as_specs(specs: Iterable[TensorSpec | dict]) -> list[TensorSpec]:
    return [s if isinstance(s, TensorSpec) else TensorSpec.from_dict(s) for s in specs]


def check_inputs(inputs: dict[str, np.ndarray], specs: Iterable[TensorSpec | dict], where: str = "model") -> None:
    """ValueError naming the input if names, shapes or dtypes differ from `specs` (string / None dims: any size)."""
    specs = _as_specs(specs)
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in inputs]
    extra = [n for n in inputs if n not in expected]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected input(s) {', '.join(extra)}")
        raise ValueError(f"{where}: {'; '.join(parts)} (expected exactly: {', '.join(expected)})")
    for s in specs:
        a = inputs[s.name]
        if not isinstance(a, np.ndarray):
            raise ValueError(f"{where}: input {s.name!r} must be a numpy array, got {type(a).__name__}")
        want = to_numpy_dtype(s.dtype)
        if a.dtype != want:
            raise ValueError(f"{where}: input {s.name!r} has dtype {a.dtype}, expected {want}")
        shape_ok = len(a.shape) == len(s.shape) and all(
            not isinstance(d, int) or d == n for d, n in zip(s.shape, a.shape))
        if not shape_ok:
            raise ValueError(f"{where}: input {s.name!r} has shape {tuple(a.shape)}, expected {tuple(s.shape)}")


class Backend(Protocol):
    input_specs: list[TensorSpec]
    output_names: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OrtBackend:
    """ONNX Runtime InferenceSession over one component's model.onnx."""

    def __init__(self, model_path: str | Path, input_specs: Iterable[TensorSpec | dict], output_names: list[str],
                 threads: int | None = None, optimization: str = "all", providers: list[str] | None = None,
                 session_config: dict[str, str] | None = None):
        import onnxruntime as ort

        self.model_path = Path(model_path)
        self.input_specs = _as_specs(input_specs)
        self.output_names = list(output_names)
        available = ort.get_available_providers()
        providers = list(providers) if providers else ["CPUExecutionProvider"]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise UserError(f"ONNX Runtime provider(s) {', '.join(unknown)} not available here "
                            f"(available: {', '.join(available)})")
        if optimization not in _OPT_LEVELS:
            raise UserError(f"unknown ONNX Runtime optimization level {optimization!r} "
                            f"(choose from {', '.join(_OPT_LEVELS)})")
        if threads is not None and threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        opts = ort.SessionOptions()
        if threads is not None:
            opts.intra_op_num_threads = int(threads)
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        for key, value in (session_config or {}).items():  # the manifest's `ort_session_config` (quantized models)
            opts.add_session_config_entry(str(key), str(value))
        self.session = ort.InferenceSession(str(self.model_path), sess_options=opts, providers=providers)
        model_inputs = {i.name for i in self.session.get_inputs()}
        model_outputs = {o.name for o in self.session.get_outputs()}
        spec_inputs = {s.name for s in self.input_specs}
        if model_inputs != spec_inputs or not set(self.output_names) <= model_outputs:
            raise UserError(f"{self.model_path}: the model's inputs {sorted(model_inputs)} / outputs "
                            f"{sorted(model_outputs)} do not match the manifest ({sorted(spec_inputs)} / "
                            f"{self.output_names})")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(inputs, self.input_specs, where=str(self.model_path))
        outs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outs))


def create_backend(name: str, model_path: str | Path, input_specs: Iterable[TensorSpec | dict],
                   output_names: list[str], *, threads: int | None = None, optimization: str = "all",
                   providers: list[str] | None = None, session_config: dict[str, str] | None = None) -> Backend:
    """A backend by name: "ort" (ONNX Runtime), "coreml" (Core ML, macOS), "coreml-reference" (numpy executor of
    the Core ML program, runtime/coreml_reference.py)."""
    if name == "ort":
        if Path(model_path).suffix == ".mlpackage":
            raise UserError(f"{model_path} is a Core ML model: use --backend coreml (macOS) or --backend "
                            f"coreml-reference (the numpy reference executor)")
        return OrtBackend(model_path, input_specs, output_names, threads=threads, optimization=optimization,
                          providers=providers, session_config=session_config)
    if name == "coreml":
        from .coreml_reference import CoreMLBackend

        return CoreMLBackend(model_path, input_specs, output_names)
    if name == "coreml-reference":
        from .coreml_reference import CoreMLReferenceBackend

        return CoreMLReferenceBackend(model_path, input_specs, output_names)
    raise UserError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")


def component_backend(package: Package, component: str, backend: str = "ort", **kwargs) -> Backend:
    """The backend for one package component, with the manifest's input specs and output names."""
    comp = package.component(component)
    if backend == "ort" and comp.raw.get("ort_session_config"):
        kwargs.setdefault("session_config", dict(comp.raw["ort_session_config"]))
    return create_backend(backend, comp.path, comp.inputs, comp.output_names, **kwargs)
