"""Values of a saved ML program: the weight blob file (weights/weight.bin), tensor types and immediate values."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError
from .dtypes import DTYPES, data_type_name, unpack_bits

WEIGHTS_PREFIX = "@model_path/"
BLOB_SENTINEL = 0xDEADBEEF


class WeightFile:
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
        dtype, nbits = DTYPES[dtype_name]
        count = int(np.prod(shape, dtype=np.int64))
        if offset + 64 > data.size:
            raise UserError(f"corrupted .mlpackage {self.root}: weight offset {offset} beyond the weight file")
        sentinel, _blob_dtype, size, start = np.frombuffer(data[offset : offset + 24].tobytes(), "<u4,<u4,<u8,<u8")[0]
        expected = (count * nbits + 7) // 8
        if sentinel != BLOB_SENTINEL or size != expected or start + size > data.size:
            raise UserError(f"corrupted .mlpackage {self.root}: bad weight blob at offset {offset}")
        raw = np.asarray(data[start : start + size])
        if nbits < 8:
            return unpack_bits(raw, nbits, count, dtype_name == "INT4").reshape(shape)
        return raw.view(np.dtype(dtype).newbyteorder("<")).astype(dtype, copy=True).reshape(shape)


def tensor_type(value_type, where: str) -> tuple[str, tuple[int, ...]]:
    kind = value_type.WhichOneof("type")
    if kind != "tensorType":
        raise UserError(f"{where}: value type {kind!r} is not supported by the reference executor")
    t = value_type.tensorType
    shape = []
    for d in t.dimensions:
        if d.WhichOneof("dimension") != "constant":
            raise UserError(f"{where}: dynamic shapes are not supported by the reference executor")
        shape.append(int(d.constant.size))
    return data_type_name(t.dataType), tuple(shape)


def immediate(value, dtype_name: str, shape: tuple[int, ...]):
    t = value.immediateValue.tensor
    field = t.WhichOneof("value")
    if dtype_name == "STRING":
        strings = [s.decode() if isinstance(s, bytes) else s for s in t.strings.values]
        return strings[0] if shape == () else np.array(strings, dtype=object).reshape(shape)
    dtype, nbits = DTYPES[dtype_name]
    count = int(np.prod(shape, dtype=np.int64))
    if field == "bytes":
        raw = np.frombuffer(t.bytes.values, np.uint8)
        arr = unpack_bits(raw, nbits, count, dtype_name == "INT4") if nbits < 8 else raw.view(dtype)[:count]
    elif field is None:
        arr = np.zeros(0, dtype)
    else:
        arr = np.array(getattr(t, field).values, dtype=dtype)
    return arr.astype(dtype, copy=True).reshape(shape)
