"""Inference backends behind one interface: `run(inputs: dict[str, ndarray]) -> dict[str, ndarray]`.

Every backend checks its inputs against the manifest's static specs (runtime/io_specs.py) before running, so a
wrong call fails with a message naming the input instead of deep inside the runtime.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import UserError
from .io_specs import TensorSpec, as_specs, check_inputs
from .package import Package

BACKENDS = ("ort", "coreml", "coreml-reference")

_OPT_LEVELS = ("disable", "basic", "extended", "all")


class Backend(Protocol):
    input_specs: list[TensorSpec]
    output_names: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OrtBackend:
    """ONNX Runtime InferenceSession over one component's model.onnx."""

    def __init__(
        self,
        model_path: str | Path,
        input_specs: Iterable[TensorSpec | dict],
        output_names: list[str],
        threads: int | None = None,
        optimization: str = "all",
        providers: list[str] | None = None,
        session_config: dict[str, str] | None = None,
    ):
        import onnxruntime as ort

        self.model_path = Path(model_path)
        self.input_specs = as_specs(input_specs)
        self.output_names = list(output_names)
        available = ort.get_available_providers()
        providers = list(providers) if providers else ["CPUExecutionProvider"]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise UserError(
                f"ONNX Runtime provider(s) {', '.join(unknown)} not available here (available: {', '.join(available)})"
            )
        if optimization not in _OPT_LEVELS:
            raise UserError(
                f"unknown ONNX Runtime optimization level {optimization!r} (choose from {', '.join(_OPT_LEVELS)})"
            )
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
            raise UserError(
                f"{self.model_path}: the model's inputs {sorted(model_inputs)} / outputs "
                f"{sorted(model_outputs)} do not match the manifest ({sorted(spec_inputs)} / "
                f"{self.output_names})"
            )

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(inputs, self.input_specs, where=str(self.model_path))
        outs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outs))


def create_backend(
    name: str,
    model_path: str | Path,
    input_specs: Iterable[TensorSpec | dict],
    output_names: list[str],
    *,
    threads: int | None = None,
    optimization: str = "all",
    providers: list[str] | None = None,
    session_config: dict[str, str] | None = None,
) -> Backend:
    """A backend by name: "ort" (ONNX Runtime), "coreml" (Core ML, macOS), "coreml-reference" (numpy executor of
    the Core ML program, runtime/coreml_reference.py)."""
    if name == "ort":
        if Path(model_path).suffix == ".mlpackage":
            raise UserError(
                f"{model_path} is a Core ML model: use --backend coreml (macOS) or --backend "
                f"coreml-reference (the numpy reference executor)"
            )
        return OrtBackend(
            model_path,
            input_specs,
            output_names,
            threads=threads,
            optimization=optimization,
            providers=providers,
            session_config=session_config,
        )
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
    if backend == "ort" and comp.entry.ort_session_config:
        kwargs.setdefault("session_config", dict(comp.entry.ort_session_config))
    return create_backend(backend, comp.path, comp.inputs, comp.output_names, **kwargs)
