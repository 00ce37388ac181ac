"""One copy of a multi-size package's weights in a process that runs several of its sizes.

The exporter stores the weights of a component's graphs (one per image size) once, in `weights.bin` beside them,
with an index `weights.json` (export/shared_weights.py). ONNX Runtime still gives every session its own copy of
the initializers, and its own pre-packed copy of each MatMul weight. `SharedWeights` maps each weights file once
and hands the same tensors to every session (`SessionOptions.add_initializer`), with pre-packing off for those
sessions: measured on a 128 MB stack of MatMuls, two sessions take 153 MB instead of 271 MB (pre-packing on, the
shared tensors are packed again per session: 409 MB), and the MatMuls run about 9 % slower at 256 rows. So it is an
option for apps that keep several sizes loaded (`Text2ImagePipeline(shared_weights=...)`), not the default.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .errors import UserError

INDEX_FILE = "weights.json"
DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64")


class SharedWeights:
    """Keeps the mapped weights files and their ONNX Runtime tensors alive; one per process (or per app)."""

    def __init__(self):
        self._files: dict[Path, np.memmap] = {}
        self._values: dict[tuple[Path, int], object] = {}  # (weights file, offset) -> OrtValue

    def initializers(self, model_path: str | Path) -> dict:
        """{initializer name: OrtValue} for the graph `model_path`, or {} when its folder has no weights index (a
        one-size package). The same (file, offset) gives the same OrtValue to every graph that reads it."""
        import onnxruntime as ort

        model_path = Path(model_path)
        index_path = model_path.parent / INDEX_FILE
        if not index_path.is_file():
            return {}
        try:
            index = json.loads(index_path.read_text())
            entries = index["graphs"][model_path.with_suffix(".onnx").name]
            weights = model_path.parent / Path(index["file"]).name
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{index_path}: not a weights index of {model_path.name}") from None
        if weights not in self._files:
            self._files[weights] = np.memmap(weights, dtype=np.uint8, mode="r")
        data = self._files[weights]
        out = {}
        for name, e in entries.items():
            try:
                offset, length, dtype, shape = int(e["offset"]), int(e["length"]), str(e["dtype"]), tuple(e["shape"])
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{index_path}: {name}: expected offset, length, dtype and shape") from None
            if dtype not in DTYPES or offset < 0 or offset + length > data.size:
                raise UserError(f"{index_path}: {name}: dtype {dtype} at {offset}+{length} is outside {weights.name}")
            if math.prod(shape) * np.dtype(dtype).itemsize != length:
                raise UserError(f"{index_path}: {name}: shape {list(shape)} of {dtype} is not {length} bytes")
            key = (weights, offset)
            if key not in self._values:
                array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
                self._values[key] = ort.OrtValue.ortvalue_from_numpy(array)
            out[name] = self._values[key]
        return out
