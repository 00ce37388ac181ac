"""The ExecuTorch backend: `--backend executorch` runs a package's `.pte` programs in ExecuTorch's runtime (its
XNNPACK delegate is the CPU path of Android and iOS apps), here through its Python bindings.

It is optional: the `executorch` extra installs it, and its bindings take torch tensors, so this module imports
torch and executorch only when the backend is created (the rest of the runtime stays torch-free).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import UserError
from .io_specs import as_specs, check_inputs


class ExecuTorchBackend:
    """`--backend executorch`: the program's `forward` method in ExecuTorch's runtime, inputs in manifest order."""

    name = "executorch"
    description = "ExecuTorch's runtime (XNNPACK delegate; pip install -e '.[executorch]')"
    targets = ("executorch",)
    platforms = None
    options = frozenset({"threads", "function"})

    def __init__(
        self,
        model_path: str | Path,
        input_specs,
        output_names: list[str],
        threads: int | None = None,
        function: str | None = None,
    ):
        """`threads`: the size of ExecuTorch's thread pool, which XNNPACK runs on (None: one per core). The pool is
        one per process: the last backend created with `threads` sets it for all. `function`: the method to run
        (a multi-size program's `image_WxH`; default `forward`)."""
        self.model_path = Path(model_path)
        if self.model_path.suffix != ".pte":
            raise UserError(
                f"{self.model_path} is not an ExecuTorch program (.pte): the executorch backend needs a package "
                "exported with --target executorch"
            )
        try:
            import torch
            from executorch.runtime import Runtime
        except ImportError as e:
            raise UserError(f"--backend executorch needs ExecuTorch: pip install -e '.[executorch]' ({e})") from None
        if threads is not None:
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

            _unsafe_reset_threadpool(threads)  # "unsafe" only while another program runs: none does here
        self._torch = torch
        self.input_specs = as_specs(input_specs)
        self.output_names = list(output_names)
        try:
            program = Runtime.get().load_program(str(self.model_path))
            self.method = program.load_method(function or "forward")
        except Exception as e:  # the bindings raise RuntimeError / ValueError carrying ExecuTorch's status
            raise UserError(
                f"{self.model_path}: ExecuTorch cannot load this program ({str(e).splitlines()[0]})"
                f"{missing_delegates(self.model_path)}"
            ) from None

    @staticmethod
    def manifest_options(entry) -> dict:
        """A multi-size program's method for this size (`components.<name>.function`)."""
        return {"function": entry.function} if entry.function else {}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(inputs, self.input_specs, where=str(self.model_path))
        feeds = [self._torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in self.input_specs]
        outputs = self.method.execute(feeds)
        return {name: out.numpy() for name, out in zip(self.output_names, outputs)}


def missing_delegates(path: Path) -> str:
    """Why a program failed to load when the reason is a delegate this ExecuTorch build lacks (a `.pte` lowered to
    Core ML, on Linux): "; it is lowered to ..., which this build lacks (it has ...)", else ""."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.extension.pybindings.portable_lib import _get_registered_backend_names

    try:
        pte = deserialize_pte_binary(Path(path).read_bytes())
    except Exception:  # not a readable program: the load error says enough
        return ""
    used = sorted({d.id for plan in pte.program.execution_plan for d in plan.delegates})
    have = _get_registered_backend_names()
    missing = [d for d in used if d not in have]
    if not missing:
        return ""
    where = " (Apple devices only)" if "CoreMLBackend" in missing else ""
    return f"; it is lowered to {', '.join(missing)}{where}, which this ExecuTorch lacks (it has {', '.join(have)})"
