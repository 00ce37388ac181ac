"""The `ort` backend: an ONNX Runtime InferenceSession over one component's model.onnx (or model.ort)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from .errors import UserError
from .io_specs import TensorSpec, as_specs, check_inputs

OPT_LEVELS = ("disable", "basic", "extended", "all")


def check_arena(cpu_arena: bool, shared_arena: bool) -> None:
    """The user's arena options: a shared arena is still an arena."""
    if shared_arena and not cpu_arena:
        raise UserError("--shared-arena needs the CPU arena: drop --no-cpu-arena")


def register_shared_arena() -> None:
    """Register ONNX Runtime's environment CPU arena (its default arena settings), which sessions with
    `session.use_env_allocators` allocate from. Registering again is harmless (ONNX Runtime keeps one per device)."""
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # -1: ONNX Runtime's defaults


class OrtBackend:
    """ONNX Runtime InferenceSession over one component's model.onnx."""

    name = "ort"
    description = "ONNX Runtime"
    targets = ("onnx", "ort-mobile")  # the package targets whose models it runs
    platforms = None  # every platform
    options = frozenset(
        {
            "threads",
            "optimization",
            "providers",
            "session_config",
            "cpu_arena",
            "shared_arena",
            "mem_pattern",
            "shared_weights",
        }
    )

    def __init__(
        self,
        model_path: str | Path,
        input_specs: Iterable[TensorSpec | dict],
        output_names: list[str],
        threads: int | None = None,
        optimization: str = "all",
        providers: list[str] | None = None,
        session_config: dict[str, str] | None = None,
        cpu_arena: bool = True,
        mem_pattern: bool = False,
        shared_weights=None,
        shared_arena: bool = False,
    ):
        """`cpu_arena`: ONNX Runtime's CPU memory arena (fast reuse of freed blocks, which it keeps until the session
        ends; ONNX Runtime's default, kept: off trades speed for a lower peak). `mem_pattern`: pre-planned
        activation buffers, ONNX Runtime's default but off here: from the second run the pattern asks the arena for
        one block of the whole run's activations on top of the pieces the first run left in it, which costs up to
        1.8x the peak (EDiT at 2048²: 4.3 GB with it, 2.4 GB without) and saved no measurable time
        (docs/memory.md). `shared_arena` (with `cpu_arena`):
        the session allocates from one CPU arena that every session of the process shares (ONNX Runtime's
        environment allocator, `session.use_env_allocators`) instead of an arena of its own; measured to save
        nothing on ONNX Runtime 1.32's CPU provider for our packages (docs/memory.md), so off by default.
        `shared_weights`: a runtime/shared_weights.py `SharedWeights` that gives this session the process's one copy
        of a multi-size package's weights (pre-packing off)."""
        import onnxruntime as ort

        self.model_path = Path(model_path)
        if self.model_path.suffix == ".mlpackage":
            raise UserError(
                f"{model_path} is a Core ML model: use --backend coreml (macOS) or --backend "
                f"coreml-reference (the numpy reference executor)"
            )
        self.input_specs = as_specs(input_specs)
        self.output_names = list(output_names)
        available = ort.get_available_providers()
        providers = list(providers) if providers else ["CPUExecutionProvider"]
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise UserError(
                f"ONNX Runtime provider(s) {', '.join(unknown)} not available here (available: {', '.join(available)})"
            )
        if optimization not in OPT_LEVELS:
            raise UserError(
                f"unknown ONNX Runtime optimization level {optimization!r} (choose from {', '.join(OPT_LEVELS)})"
            )
        if threads is not None and threads < 1:
            raise UserError(f"threads must be >= 1, got {threads}")
        opts = ort.SessionOptions()
        opts.enable_cpu_mem_arena, opts.enable_mem_pattern = bool(cpu_arena), bool(mem_pattern)
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
        if shared_arena and cpu_arena:
            register_shared_arena()
            opts.add_session_config_entry("session.use_env_allocators", "1")
        # .ort files keep their own (optimised) initializers: only ONNX graphs take shared ones.
        shared = (
            shared_weights.initializers(self.model_path) if shared_weights and self.model_path.suffix == ".onnx" else {}
        )
        if shared:  # pre-packing would give each session its own packed copy of the shared MatMul weights
            opts.add_session_config_entry("session.disable_prepacking", "1")
            for name, value in shared.items():
                opts.add_initializer(name, value)
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

    @staticmethod
    def manifest_options(entry) -> dict:
        """Options a component's manifest entry sets: the session config entries `edit-mobile quantize` recorded."""
        return {"session_config": dict(entry.ort_session_config)} if entry.ort_session_config else {}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(inputs, self.input_specs, where=str(self.model_path))
        outs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outs))
