"""MIL data types: proto DataType names and MIL dtype strings as numpy dtypes, and sub-byte unpacking."""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .proto import proto_modules

# MIL proto DataType name -> (numpy dtype, bits per element in packed form)
DTYPES = {
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
DTYPE_STRINGS = {
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


def data_type_name(code: int) -> str:
    """The MIL proto DataType name of an enum value ("FLOAT16", ...); UserError for a type this executor lacks."""
    _, mil = proto_modules()
    try:
        name = mil.DataType.Name(code)
    except ValueError:
        name = str(code)
    if name not in DTYPES and name != "STRING":
        raise UserError(f"Core ML data type {name} is not supported by the reference executor")
    return name
