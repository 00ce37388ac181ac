"""Predict a package's peak memory per phase before it runs (`edit-mobile inspect PKG --budget-mb N`,
`export --budget-mb N`), from what the graphs say statically and how ONNX Runtime's CPU provider allocates:

- weights W: each graph's initializer bytes. External data is mapped and used in place; a graph that keeps its
  weights inline is read whole before its tensors are built, a transient of about W more while the session is
  created.
- activations P: the largest set of intermediate tensors alive at once when the nodes run in their stored
  (topological) order, every value freed after its last reader: what the memory planner lays out for a run.
- ONNX Runtime's CPU arena (on by default) keeps what a session's runs touched until the session ends: about P,
  the later runs reusing the first run's pieces. With ONNX Runtime's memory pattern (off in our runtime, `generate
  --mem-pattern`), 2P from the second run: the pattern's one block of the whole peak comes on top of the first
  run's pieces. Without the arena, P is freed after each run.
- about 25 MB per session of thread buffers and allocator slack, and the process itself: the resident memory of a
  fresh interpreter that imported the runtime (measured once).

The phases and modes follow `runtime/pipeline.py` and `bench --memory-phases`: in the default mode every session is
created up front, so the phases add up; in the low mode one component (one chunk of a streamed text encoder) is
alive at a time, with the arena off. Checked against `bench --memory-phases` in tests/test_budget.py and on the
true-size PixArt-Σ-XL package in docs/memory.md.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from ..runtime.errors import UserError
from ..runtime.families import family
from ..runtime.package import Package, load_package

MB = 2**20
# Ops whose output is their input's buffer, and elementwise ops that may write into a dying input of equal size.
ALIAS_OPS = frozenset({"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"})
INPLACE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Relu", "Sigmoid", "Tanh", "Erf", "Neg", "Sqrt", "Where"})
SESSION_MB = 25.0  # per session: thread buffers, allocator slack (measured: arena off, T5-XXL chunks)
PHASES = ("load", "text_encoding", "denoising", "decoding")


def _value_bytes(value: onnx.ValueInfoProto) -> int:
    t = value.type.tensor_type
    dims = [d.dim_value for d in t.shape.dim]
    if not dims and not t.HasField("shape"):
        return 0
    return math.prod(dims) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize


def graph_memory(path: str | Path, folds_dequantize: bool = False) -> dict:
    """{"weights": initializer bytes, "inline": those stored in the graph file, "activations": peak bytes of
    intermediate values alive at once}. `folds_dequantize`: the session folds constant DequantizeLinear nodes (the
    `session.disable_quant_qdq` entry that `quantize` records for int8 Conv weights), so those weights are held
    dequantized, in fp32."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    dequantized = (n for n in graph.node if n.op_type == "DequantizeLinear")
    folded = (
        {n.input[0] for n in dequantized if all(i in constants for i in n.input if i)} if folds_dequantize else set()
    )
    weights = inline = 0
    for t in graph.initializer:
        if uses_external_data(t):
            size = ExternalDataInfo(t).length or 0
        else:
            size = len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
            inline += size
        weights += math.prod(t.dims) * 4 if t.name in folded else size
    sizes = {v.name: _value_bytes(v) for v in [*graph.input, *graph.value_info, *graph.output]}
    initializers = {t.name for t in graph.initializer}
    last_use = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            last_use[name] = i
    keep = {o.name for o in graph.output}
    # Buffers, as ONNX Runtime's allocation planner shares them: a reshape's output is its input's buffer, and an
    # elementwise op writes into an input that dies at it when the sizes match.
    buffer_of = {i.name: i.name for i in graph.input if i.name not in initializers}
    holders = {b: {b} for b in buffer_of}
    current = sum(sizes.get(n, 0) for n in buffer_of)
    peak = current
    for i, node in enumerate(graph.node):
        data_inputs = [n for n in node.input if n in buffer_of]
        dying = [n for n in data_inputs if last_use.get(n) == i and n not in keep]
        for name in (n for n in node.output if n):
            if node.op_type in ALIAS_OPS and data_inputs:
                buffer = buffer_of[data_inputs[0]]
            else:
                reuse = [n for n in dying if node.op_type in INPLACE_OPS and sizes.get(n) == sizes.get(name)]
                buffer = buffer_of[reuse[0]] if reuse else name
                if reuse:
                    dying.remove(reuse[0])
                else:
                    current += sizes.get(name, 0)
            buffer_of[name] = buffer
            holders.setdefault(buffer, set()).add(name)
        peak = max(peak, current)
        for name in [*node.input, *node.output]:
            if name in buffer_of and last_use.get(name, -1) <= i and name not in keep:
                buffer = buffer_of.pop(name)
                holders[buffer].discard(name)
                if not holders[buffer]:
                    current -= sizes.get(buffer, 0)
                    del holders[buffer]
    return {"weights": weights, "inline": inline, "activations": peak}


def process_baseline_mb() -> float:
    """Resident memory of a fresh interpreter after importing the runtime (what `bench` calls the baseline)."""
    code = "from edit_mobile.runtime.bench import current_rss_mb\nprint(current_rss_mb())"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        return float(out)
    except (subprocess.CalledProcessError, ValueError, OSError):
        return 0.0  # no /proc (not Linux): the prediction leaves the interpreter out


def _component_memory(package: Package, name: str) -> list[dict]:
    """Per graph of the component (one, or each chunk in order): its weights and activations."""
    comp = package.component(name)
    folds = (comp.entry.ort_session_config or {}).get("session.disable_quant_qdq") == "1"
    return [graph_memory(p.with_suffix(".onnx"), folds) for p in (comp.chunk_paths or (comp.path,))]


def arena_mb(peak_mb: float, runs: int, mem_pattern: bool = False) -> float:
    """What ONNX Runtime's BFC arena keeps resident after `runs` runs that need `peak_mb` at once. The arena returns
    nothing before the session ends; the first run's tensors are allocated one by one (the pages they touch, about
    the peak) and later runs reuse them, unless the memory pattern is on: from the second run it asks for one block
    of the whole peak, a region of its own (bfc_arena.cc, execution_frame.cc). Regions are reserved in powers of
    two, but only touched pages count."""
    return peak_mb * (min(runs, 2) if mem_pattern else 1)


def predict(
    package: Package | str | Path, baseline_mb: float | None = None, cpu_arena: bool = True, mem_pattern: bool = False
) -> dict:
    """{"default": {phase: MB}, "low": {phase: MB}, "components": {name: {weights_mb, activations_mb}},
    "baseline_mb"}: the predicted peak resident memory of each phase of one image in each memory mode (`cpu_arena`,
    `mem_pattern`: the default mode's arena and memory pattern, as `generate --no-cpu-arena / --mem-pattern` set
    them; the low mode runs without either)."""
    package = package if isinstance(package, Package) else load_package(package)
    if package.target == "coreml":
        raise UserError("--budget-mb predicts ONNX Runtime memory: ONNX and ORT-mobile packages only")
    encoders = [e.component for e in family(package.family).text_encoders]
    loop = [*encoders, "transformer", "vae_decoder"]
    graphs = {name: [{k: v / MB for k, v in g.items()} for g in _component_memory(package, name)] for name in loop}
    base = process_baseline_mb() if baseline_mb is None else baseline_mb

    def alive(g: dict) -> float:  # one session created (an inline graph read whole meanwhile) and running
        return g["weights"] + g["inline"] + g["activations"] + SESSION_MB

    def kept(name: str) -> float:  # what a component's sessions keep once they ran, in the default mode
        runs = 1 if name == "vae_decoder" else 2  # per image: the decoder once; prompts and steps at least twice
        arena = sum(arena_mb(g["activations"], runs, mem_pattern) for g in graphs[name]) if cpu_arena else 0.0
        return arena + SESSION_MB * len(graphs[name])

    def running(name: str) -> float:  # the extra while it runs, over what it keeps
        return 0.0 if cpu_arena else max(g["activations"] for g in graphs[name])

    weights = sum(g["weights"] for gs in graphs.values() for g in gs)
    text = sum(kept(n) for n in encoders)
    default = {
        "load": base + weights + max(g["inline"] for gs in graphs.values() for g in gs),
        "text_encoding": base + weights + text + max(running(n) for n in encoders),
        "denoising": base + weights + text + kept("transformer") + running("transformer"),
        "decoding": base + weights + text + kept("transformer") + kept("vae_decoder") + running("vae_decoder"),
    }
    # Low: one component at a time, arena off; a chunked text encoder streams one chunk at a time.
    low = {
        "load": base,
        "text_encoding": base + max(alive(g) for n in encoders for g in graphs[n]),
        "denoising": base + max(alive(g) for g in graphs["transformer"]),
        "decoding": base + max(alive(g) for g in graphs["vae_decoder"]),
    }
    components = {
        n: {
            "weights_mb": round(sum(g["weights"] for g in gs), 1),
            "activations_mb": round(max(g["activations"] for g in gs), 1),
        }
        for n, gs in graphs.items()
    }
    return {
        "baseline_mb": round(base, 1),
        "cpu_arena": cpu_arena,
        "mem_pattern": mem_pattern,
        "components": components,
        "default": {p: round(v, 1) for p, v in default.items()},
        "low": {p: round(v, 1) for p, v in low.items()},
    }


def fits(prediction: dict, budget_mb: float) -> dict:
    """{"default": bool, "low": bool, "advice": str}: whether each mode's peak is within the budget, and if the low
    mode is not, which component is the largest and what would shrink it."""
    out = {mode: max(prediction[mode].values()) <= budget_mb for mode in ("default", "low")}
    worst = max(prediction["components"], key=lambda n: prediction["components"][n]["weights_mb"])
    out["advice"] = (
        f"largest component: {worst} ({prediction['components'][worst]['weights_mb']:.0f} MB of weights); "
        "fit it with `quantize --precision int8-weights|int4-weights`, `export --transformer-chunks K` or "
        "`--max-component-mb N`, `export --vae-tile PX`, and run with `--memory low`"
    )
    return out


def format_prediction(prediction: dict, budget_mb: float | None = None) -> str:
    lines = [f"{'mode':<9}" + "".join(f"{p:>15}" for p in PHASES) + f"{'peak':>10}  (MB, predicted)"]
    for mode in ("default", "low"):
        values = prediction[mode]
        lines.append(f"{mode:<9}" + "".join(f"{values[p]:>15.0f}" for p in PHASES) + f"{max(values.values()):>10.0f}")
    if budget_mb is not None:
        verdict = fits(prediction, budget_mb)
        for mode in ("default", "low"):
            lines.append(f"--memory {mode}: {'fits' if verdict[mode] else 'does NOT fit'} in {budget_mb:.0f} MB")
        if not verdict["low"]:
            lines.append(verdict["advice"])
    return "\n".join(lines)
