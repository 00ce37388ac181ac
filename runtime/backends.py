"""Inference backends behind one interface: `run(inputs: dict[str, ndarray]) -> dict[str, ndarray]`, chosen by name
from one registry.

Every backend checks its inputs against the manifest's static specs (runtime/io_specs.py) before running, so a
wrong call fails with a message naming the input instead of deep inside the runtime.

A backend is a class registered in `BACKENDS` under its `name`, with:
  `targets`     the package targets (manifest `target`) whose models it runs;
  `platforms`   the `sys.platform` values it runs on (None: every platform);
  `options`     the keyword options its constructor takes (ONNX Runtime: threads, optimization, providers,
                session_config); options meant for another backend are ignored, as Core ML has no thread setting;
  `manifest_options(entry)`  options that a component's manifest entry sets (ONNX Runtime: `ort_session_config`);
  `__init__(model_path, input_specs, output_names, **options)` and `run(inputs)`.
The runtime asks the registry (`create_backend`, `component_backend`, `backend_for_target`) and never branches on a
backend's name. Built in: `ort` (runtime/ort_backend.py), `coreml` and `coreml-reference`
(runtime/coreml_backend.py; the latter runs the numpy MIL executor of runtime/mil), `executorch`
(runtime/executorch_backend.py; optional, it imports torch and executorch when created).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import numpy as np

from .coreml_backend import CoreMLBackend, CoreMLReferenceBackend
from .errors import UserError
from .executorch_backend import ExecuTorchBackend
from .heap import trim_heap
from .io_specs import TensorSpec, as_specs, check_inputs
from .ort_backend import OrtBackend
from .package import Package
from .tiling import TiledBackend, tile_spec


class Backend(Protocol):
    input_specs: list[TensorSpec]
    output_names: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


# name -> backend class, in the order the error messages list them and `backend_for_target` prefers them.
BACKENDS: dict[str, type] = {}


def register_backend(cls: type) -> type:
    """Add a backend class to the registry under `cls.name` (usable as a class decorator)."""
    for attr in ("name", "targets", "platforms", "options", "manifest_options", "run"):
        if not hasattr(cls, attr):
            raise TypeError(f"backend {cls.__name__} lacks {attr!r}")
    BACKENDS[cls.name] = cls
    return cls


for _cls in (OrtBackend, CoreMLBackend, CoreMLReferenceBackend, ExecuTorchBackend):
    register_backend(_cls)


def backend_class(name: str) -> type:
    """The registered backend class `name`; UserError naming the choices for an unknown one."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise UserError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})") from None


def backend_for_target(target: str | None, platform: str | None = None) -> str:
    """The first registered backend that runs packages of `target` on `platform` (default: this machine): ONNX
    Runtime for ONNX / ORT-mobile packages; Core ML on macOS, else the numpy reference executor, for Core ML ones."""
    platform = sys.platform if platform is None else platform
    target = target or "onnx"
    for name, cls in BACKENDS.items():
        if target in cls.targets and (cls.platforms is None or platform in cls.platforms):
            return name
    raise UserError(f"no backend runs {target!r} packages on {platform}")


def create_backend(
    name: str,
    model_path: str | Path,
    input_specs: Iterable[TensorSpec | dict],
    output_names: list[str],
    **options,
) -> Backend:
    """A backend by name: "ort" (ONNX Runtime), "coreml" (Core ML, macOS), "coreml-reference" (numpy executor of
    the Core ML program, runtime/mil), "executorch" (ExecuTorch's runtime). `options` that this backend does not
    take but another one does are ignored (e.g. `threads` for Core ML); an option no backend takes is a TypeError."""
    cls = backend_class(name)
    known = set().union(*(c.options for c in BACKENDS.values()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"create_backend() got unknown option(s) {', '.join(unknown)}")
    taken = {k: v for k, v in options.items() if k in cls.options}
    return cls(model_path, input_specs, output_names, **taken)


class ChainBackend:
    """A chunked component (manifest `chunks`): one backend per chunk, run in order; each chunk reads the
    component's inputs and the outputs of the chunks before it by name. `chunks` holds (create the chunk's
    backend, its input names); with `stream`, each chunk's backend is created when the chain reaches it and
    released after it ran, so that one chunk's weights are in memory at a time (for a component that runs once per
    image, like a text encoder); without, all are created up front and kept."""

    def __init__(self, chunks: list[tuple[Callable, list[str]]], input_specs, output_names: list[str], stream=False):
        self.input_specs, self.output_names, self.stream = as_specs(input_specs), list(output_names), stream
        self.chunks = chunks if stream else [(create(), names) for create, names in chunks]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_inputs(inputs, self.input_specs, where="chunked component")
        values = dict(inputs)
        for chunk, names in self.chunks:
            backend = chunk() if self.stream else chunk
            values.update(backend.run({n: values[n] for n in names}))
            del backend  # streamed: this chunk's session goes before the next one is created
            if self.stream:
                trim_heap()
        return {n: values[n] for n in self.output_names}


def component_backend(
    package: Package, component: str, backend: str | None = None, stream_chunks: bool = False, **options
) -> Backend:
    """The backend for one package component, with the manifest's input specs and output names, and the options
    its manifest entry sets (explicit `options` take precedence); a chained one for a chunked component, a tiled
    one for a tiled component (`stream_chunks`: its chunks created one at a time as the chain runs). `backend`
    None: the package target's (`backend_for_target`); one that does not run this target is a UserError."""
    backend = backend or backend_for_target(package.target)
    cls = backend_class(backend)
    if (package.target or "onnx") not in cls.targets:
        raise UserError(
            f"the {backend} backend runs {' / '.join(cls.targets)} packages, not {package.root} (target "
            f"{package.target}): use --backend {backend_for_target(package.target)}"
        )
    comp = package.component(component)
    options = {**cls.manifest_options(comp.entry), **options}
    tiling = comp.entry.tiling
    if tiling is not None:  # the graph takes one tile; the component, full-size inputs (runtime/tiling.py)
        graph = create_backend(backend, comp.path, [tile_spec(comp.inputs[0], tiling)], comp.output_names, **options)
        return TiledBackend(graph, tiling, comp.inputs, comp.output_names)
    if not comp.entry.chunks:
        return create_backend(backend, comp.path, comp.inputs, comp.output_names, **options)

    def creator(path, chunk):
        return lambda: create_backend(backend, path, chunk.inputs, [s.name for s in chunk.outputs], **options)

    chunks = [(creator(path, c), [s.name for s in c.inputs]) for path, c in zip(comp.chunk_paths, comp.entry.chunks)]
    return ChainBackend(chunks, comp.inputs, comp.output_names, stream=stream_chunks)
