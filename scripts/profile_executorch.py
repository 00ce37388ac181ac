"""Where a transformer call's time goes on ExecuTorch (XNNPACK) and on ONNX Runtime (CPU), by kind of kernel, from
each runtime's own profiler: ExecuTorch's ETDump (every XNNPACK operator inside the delegate calls and every
portable operator outside them) and ONNX Runtime's session profile (every node). Same random inputs, same threads,
one warm-up call, then one profiled call. docs/executorch.md reads it next to scripts/bench_executorch.py:

    python scripts/profile_executorch.py ET_PKG ORT_PKG --threads 2 --json profile.json

ET_PKG is a package exported with `--target executorch`, ORT_PKG one with `--target onnx` (either may be
quantized). The report gives, per runtime, milliseconds per kind (gemm: linear, batched matmul and convolution
kernels; quantize: run-time activation quantization; layout: transposes, copies, slices, reshapes; reduce: means and
normalisations; softmax; elementwise: the rest), the time outside any kernel (the runtime's own), and the ten
costliest kernels.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

KINDS = (  # first match wins; names are XNNPACK's operator names, ExecuTorch's portable ops and ONNX op types
    ("gemm", ("Fully Connected", "Batch Matrix Multiply", "Convolution", "MatMul", "Gemm", "Conv")),
    ("quantize", ("Convert", "QuantizeLinear", "DequantizeLinear", "DynamicQuantize")),
    ("layout", ("Transpose", "Slice", "copy", "Copy", "Concat", "Reshape", "Expand", "expand", "slice", "split",
                "Split", "unsqueeze", "Unsqueeze", "Squeeze", "dim_order", "Gather", "Pad", "view", "Tile", "full",
                "Reorder")),
    ("reduce", ("Mean", "Reduce", "LayerNorm", "Normalization", "Sqrt", "Rsqrt")),
    ("softmax", ("Softmax",)),
)  # fmt: skip


def kind_of(name: str) -> str:
    return next((kind for kind, keys in KINDS if any(k in name for k in keys)), "elementwise")


def random_inputs(backend) -> dict[str, np.ndarray]:
    from edit_mobile.runtime.io_specs import to_numpy_dtype

    rng = np.random.default_rng(0)
    return {s.name: rng.standard_normal(s.shape).astype(to_numpy_dtype(s.dtype)) for s in backend.input_specs}


def summarize(kernels: dict[str, float], total_ms: float) -> dict:
    by_kind: dict[str, float] = defaultdict(float)
    for name, ms in kernels.items():
        by_kind[kind_of(name)] += ms
    inside = sum(kernels.values())
    return {
        "call_ms": round(total_ms, 1),
        "kernels_ms": round(inside, 1),
        "outside_kernels_ms": round(total_ms - inside, 1),
        "by_kind_ms": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": {k: round(v, 1) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:10]},
    }


def profile_executorch(package_dir: Path, threads: int) -> dict:
    """ETDump of one call of the transformer program (after a warm-up call)."""
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch, _unsafe_reset_threadpool

    from edit_mobile.runtime.backends import component_backend
    from edit_mobile.runtime.package import load_package

    package = load_package(package_dir)
    spec_backend = component_backend(package, "transformer", threads=threads)  # the manifest's input order
    feeds = random_inputs(spec_backend)
    _unsafe_reset_threadpool(threads)
    module = _load_for_executorch(str(spec_backend.model_path), enable_etdump=True)
    method = package.component("transformer").entry.function or "forward"  # a multi-size program: this size's
    args = [torch.from_numpy(feeds[s.name]) for s in spec_backend.input_specs]
    module.run_method(method, args)
    module.run_method(method, args)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "etdump.etdp"
        module.write_etdump_result_to_file(str(path))
        frame = Inspector(etdump_path=str(path)).to_dataframe()
    frame = frame[frame.event_block_name == "Execute"]
    call_ms = 0.0
    kernels: dict[str, float] = defaultdict(float)
    for name, raw in zip(frame.event_name, frame.raw):
        ms = float(raw[-1])  # the profiled (second) call
        if name == "Method::execute":
            call_ms = ms
        elif name in ("DELEGATE_CALL", "OPERATOR_CALL"):
            continue  # wrappers around the kernels below
        else:
            # "Fully Connected (NC, F32) GEMM #2" -> one XNNPACK operator kind; "native_call_expand_copy.out"
            kernels[re.sub(r" #\d+$", "", name).removeprefix("native_call_")] += ms
    return summarize(kernels, call_ms)


def profile_onnxruntime(package_dir: Path, threads: int) -> dict:
    """ONNX Runtime's session profile of one call of the transformer graph (after a warm-up call)."""
    import onnxruntime as ort

    from edit_mobile.runtime.backends import component_backend
    from edit_mobile.runtime.package import load_package

    package = load_package(package_dir)
    spec_backend = component_backend(package, "transformer", threads=threads)
    feeds = random_inputs(spec_backend)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(spec_backend.model_path), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[-1]["ts"]
    kernels: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["ts"] >= start and e["name"].endswith("_kernel_time"):
            kernels[e["args"]["op_name"]] += e["dur"] / 1e3
    return summarize(kernels, runs[-1]["dur"] / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("executorch_package", type=Path)
    parser.add_argument("onnxruntime_package", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = {
        "threads": args.threads,
        "executorch": {"package": str(args.executorch_package)}
        | profile_executorch(args.executorch_package, args.threads),
        "onnxruntime": {"package": str(args.onnxruntime_package)}
        | profile_onnxruntime(args.onnxruntime_package, args.threads),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
