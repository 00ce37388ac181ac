"""Input specs at run time: manifest dtype names as numpy dtypes, and the check every backend runs on its inputs
(names, shapes, dtypes) before running, so that a wrong call fails with a message naming the input.

Its own module so that every backend (runtime/ort_backend.py, runtime/coreml_backend.py) and the registry
(runtime/backends.py) share it without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """One static input or output of a component: name, shape, dtype name as written in the manifest."""

    name: str
    shape: tuple
    dtype: str

    @classmethod
    def from_dict(cls, d: dict) -> TensorSpec:
        return cls(name=str(d["name"]), shape=tuple(d["shape"]), dtype=str(d["dtype"]))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


# Manifest dtype names (numpy names, the short forms used in docs/package.md, ONNX type strings) -> numpy dtype.
_DTYPES = {
    "f32": np.float32,
    "float": np.float32,
    "float32": np.float32,
    "tensor(float)": np.float32,
    "f16": np.float16,
    "half": np.float16,
    "float16": np.float16,
    "tensor(float16)": np.float16,
    "f64": np.float64,
    "double": np.float64,
    "float64": np.float64,
    "tensor(double)": np.float64,
    "i64": np.int64,
    "int64": np.int64,
    "tensor(int64)": np.int64,
    "i32": np.int32,
    "int32": np.int32,
    "tensor(int32)": np.int32,
    "bool": np.bool_,
    "tensor(bool)": np.bool_,
}
DTYPE_NAMES = frozenset(_DTYPES)


def to_numpy_dtype(name: str) -> np.dtype:
    """Numpy dtype of a manifest dtype name ("float32", "f32", "int64", "tensor(float)", ...)."""
    try:
        return np.dtype(_DTYPES.get(str(name).lower()) or name)
    except TypeError:
        raise ValueError(f"unknown dtype {name!r} in the manifest") from None


def as_specs(specs: Iterable[TensorSpec | dict]) -> list[TensorSpec]:
    return [s if isinstance(s, TensorSpec) else TensorSpec.from_dict(s) for s in specs]


def check_inputs(inputs: dict[str, np.ndarray], specs: Iterable[TensorSpec | dict], where: str = "model") -> None:
    """ValueError naming the input if names, shapes or dtypes differ from `specs` (string / None dims: any size)."""
    specs = as_specs(specs)
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
            not isinstance(d, int) or d == n for d, n in zip(s.shape, a.shape)
        )
        if not shape_ok:
            raise ValueError(f"{where}: input {s.name!r} has shape {tuple(a.shape)}, expected {tuple(s.shape)}")
