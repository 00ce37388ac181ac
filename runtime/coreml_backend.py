"""The Core ML backends: `coreml` (Core ML itself, macOS only) and `coreml-reference` (the saved ML program run by
the numpy MIL executor of runtime/mil, anywhere).

Both open a component's `model.mlpackage`, check their inputs against the manifest's static specs and cast them to
the program's dtypes (token ids are int64 in the manifest, int32 inside Core ML).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .errors import UserError
from .io_specs import as_specs, check_inputs
from .mil import MILProgram


def _check_mlpackage(model_path: Path) -> None:
    if model_path.suffix != ".mlpackage":
        raise UserError(
            f"{model_path} is not a Core ML model (.mlpackage): Core ML backends need a package "
            f"exported with --target coreml"
        )


class CoreMLReferenceBackend:
    """`--backend coreml-reference`: the saved ML program executed by the numpy reference executor (slow, exact
    to the program's declared dtypes; for checking on machines without Core ML)."""

    name = "coreml-reference"
    description = "the numpy executor of the saved Core ML program (runtime/mil)"
    targets = ("coreml",)
    platforms = None
    options = frozenset({"function"})

    def __init__(self, model_path: str | Path, input_specs, output_names: list[str], function: str | None = None):
        self.model_path = Path(model_path)
        _check_mlpackage(self.model_path)
        self.input_specs = as_specs(input_specs)
        self.output_names = list(output_names)
        self.program = MILProgram(self.model_path, component=self.model_path.parent.name, function=function)
        if set(self.program.inputs) != {s.name for s in self.input_specs} or not set(self.output_names) <= set(
            self.program.output_names
        ):
            raise UserError(
                f"{self.model_path}: the program's inputs {sorted(self.program.inputs)} / outputs "
                f"{self.program.output_names} do not match the manifest"
            )

    @staticmethod
    def manifest_options(entry) -> dict:
        """A multi-function program's function for this size (`components.<name>.function`)."""
        return {"function": entry.function} if entry.function else {}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(inputs, self.input_specs, where=str(self.model_path))
        out = self.program.run(inputs)
        return {name: out[name] for name in self.output_names}


class CoreMLBackend:
    """`--backend coreml`: Core ML itself (macOS only), through coremltools' MLModel.predict."""

    name = "coreml"
    description = "Core ML (macOS)"
    targets = ("coreml",)
    platforms = ("darwin",)
    options = frozenset({"compute_units", "function"})

    def __init__(
        self,
        model_path: str | Path,
        input_specs,
        output_names: list[str],
        compute_units: str = "ALL",
        function: str | None = None,
    ):
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
        self.model = ct.models.MLModel(str(self.model_path), compute_units=units, function_name=function)
        codes = {65568: np.float32, 65552: np.float16, 131104: np.int32}  # ArrayFeatureType.ArrayDataType
        self._dtypes = {
            i.name: codes.get(i.type.multiArrayType.dataType, np.float32)
            for i in self.model.get_spec().description.input
        }

    manifest_options = CoreMLReferenceBackend.manifest_options

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(inputs, self.input_specs, where=str(self.model_path))
        out = self.model.predict({k: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in inputs.items()})
        return {name: np.asarray(out[name]) for name in self.output_names}
