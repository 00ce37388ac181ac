"""A numpy executor of Core ML ML programs (MIL, the `.mlpackage` format): read a saved program and evaluate it.

Core ML executes only on Apple platforms. To check an exported program anywhere else we read the saved package
(`Data/com.apple.CoreML/model.mlmodel`, a protobuf, and `weights/weight.bin`, the MIL blob file) and evaluate its
operations one by one in numpy, following the MIL op definitions of coremltools
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
stay torch-free). Only coremltools' generated protobuf modules are loaded (`proto.py`).

Modules: `proto` (the protobuf modules), `dtypes` (MIL data types, sub-byte unpacking), `storage` (the weight blob
file and immediate values), `ops` (the semantics of every supported op), `program` (`MILProgram`: load, check,
run). The package knows nothing about inference backends: runtime/coreml_backend.py wraps it as one.
"""

from .program import MODEL_FILE, MILProgram, load_program

__all__ = ["MODEL_FILE", "MILProgram", "load_program"]
