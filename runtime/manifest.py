"""The package manifest (docs/package.md) as dataclasses: the one definition of the package format.

`Manifest.from_dict` checks every field and refuses a malformed one with a single line naming the field and what
was expected; `to_dict` gives the JSON form; `save` writes manifest.json atomically. Paths are checked here as
text (relative, not leaving the package); `runtime/package.py: load_package` then resolves them on disk (symlinks),
checks that the files exist and their sha256. Packages are written by `export/package_writer.py` only.

No torch here: the on-device runtime reads every package through this module.
"""

from __future__ import annotations

import copy
import json
import math
import posixpath
from dataclasses import dataclass, field, fields, replace
from pathlib import Path, PurePosixPath
from typing import Any

from .atomic import write_file_atomic
from .errors import UserError
from .families import FAMILIES as FAMILY_REGISTRY
from .io_specs import DTYPE_NAMES, TensorSpec
from .tiling import Tiling

SCHEMA_VERSION = 1
FAMILIES = tuple(FAMILY_REGISTRY)  # the family registry's names (runtime/families.py)
TARGETS = ("onnx", "ort-mobile", "coreml", "executorch")
# What `edit-mobile quantize` makes of an fp32 package's components, per format.
ONNX_PRECISIONS = ("fp16", "int8-dynamic", "int8-static", "int8-weights", "int4-weights")
COREML_PRECISIONS = ("int8-weights", "int4-weights", "palettize-4", "palettize-6", "w8a8")
EXECUTORCH_PRECISIONS = ("int8-dynamic", "int4-weights")  # `export --target executorch --precision`
# Minimum PSNR (dB) of a component's output against PyTorch fp32, by its precision: checked when the component is
# written (export, quantize) and by `validate`, and recorded as the component's `gate_psnr_db`. Core ML compression
# (docs/coreml.md) was set from the tiny presets through the reference executor (their random weights are the hard
# case for palettization): palettize-6 measured 37.5 / 43.8 dB (text encoder / transformer), palettize-4
# 26.1 / 34.4 dB; w8a8 is static int8 activations, gated as ONNX's int8-static.
GATES_DB = {
    "fp32": 60.0,
    "fp16": 40.0,
    "int8-weights": 35.0,
    "int8-dynamic": 25.0,
    "int8-static": 25.0,
    "int4-weights": 25.0,
    "palettize-6": 30.0,
    "palettize-4": 20.0,
    "w8a8": 25.0,
}
PRECISIONS = tuple(GATES_DB)
MANIFEST = "manifest.json"
REQUIRED = (
    "schema_version",
    "family",
    "resolution",
    "batch",
    "latent_shape",
    "vae",
    "transformer_out_channels",
    "text",
    "scheduler",
    "components",
)
# Bounds on every size a manifest states: far above any real model (a 4096² image has a 512² latent grid), low
# enough that a corrupted number is refused before the runtime allocates from it.
MAX_DIM = 1 << 16
MAX_ELEMENTS = 1 << 31
HEX_DIGITS = "0123456789abcdefABCDEF"
TOKENIZER_FILE = "tokenizer.json"  # the file of a tokenizer folder that the runtime reads (runtime/tokenizer.py)


def check_relative(rel: Any, what: str) -> str:
    """`rel` as a normalised relative path; UserError if it is not a path, is absolute or leaves the package (as
    text: `runtime/package.py: resolve_inside` also follows symlinks)."""
    if not isinstance(rel, str) or not rel:
        raise UserError(f"manifest {what}: expected a relative path, got {rel!r}")
    norm = posixpath.normpath(rel)
    if Path(rel).is_absolute() or rel.startswith("/") or norm == ".." or norm.startswith("../"):
        raise UserError(f"manifest {what}: path {rel!r} leaves the package folder; refusing it")
    return norm


def _covers(frel: str, rel: str) -> bool:
    """True if file `frel` is `rel` itself or lies inside folder `rel` (both relative to the package root)."""
    return PurePosixPath(posixpath.normpath(frel)).is_relative_to(PurePosixPath(posixpath.normpath(rel)))


class Fields:
    """Typed reads of manifest fields: each violation is a UserError naming the field and what was expected."""

    def __init__(self, where: str | Path = MANIFEST):
        self.where = where

    def fail(self, field: str, expected: str, value: Any) -> UserError:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return UserError(f"{self.where}: {field}: expected {expected}, got {shown}")

    def obj(self, value: Any, field: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(field, "an object", value)
        return value

    def string(self, value: Any, field: str, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(field, "a non-empty string", value)
        return value

    def integer(self, value: Any, field: str, low: int = 1, high: int = MAX_DIM) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.fail(field, f"an integer in [{low}, {high}]", value)
        return value

    def number(self, value: Any, field: str, optional: bool = False) -> float | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
            raise self.fail(field, "a finite non-zero number", value)
        return float(value)

    def shape(self, value: Any, field: str, rank: int | None = None) -> tuple[int, ...]:
        if not isinstance(value, list) or not value or (rank is not None and len(value) != rank):
            raise self.fail(field, f"a list of {rank or 'one or more'} positive integers", value)
        dims = tuple(self.integer(v, f"{field}[{i}]") for i, v in enumerate(value))
        if math.prod(dims) > MAX_ELEMENTS:
            raise self.fail(field, f"at most {MAX_ELEMENTS} elements", value)
        return dims

    def choice(self, value: Any, field: str, choices, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or value not in choices:
            raise self.fail(field, f"one of {', '.join(sorted(choices))}", value)
        return value

    def optional_obj(self, value: Any, field: str) -> dict | None:
        return None if value is None else self.obj(value, field)

    def path(self, value: Any, field: str) -> str:
        rel = self.string(value, field)
        check_relative(rel, field)
        return rel

    def tensors(self, value: Any, field: str) -> tuple[TensorSpec, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(field, "a non-empty list of tensor specs", value)
        specs = []
        for i, s in enumerate(value):
            s = self.obj(s, f"{field}[{i}]")
            specs.append(
                TensorSpec(
                    name=self.string(s.get("name"), f"{field}[{i}].name"),
                    shape=self.shape(s.get("shape"), f"{field}[{i}].shape"),
                    dtype=self.choice(s.get("dtype"), f"{field}[{i}].dtype", DTYPE_NAMES),
                )
            )
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise self.fail(field, "distinct names", names)
        return tuple(specs)

    def files(self, value: Any, field: str, covers: str, what: str, needed: str) -> dict[str, str]:
        """A `files` map {relpath: sha256}: non-empty, every path inside the package, a hex digest per file, and a
        hash for `covers` (the file the runtime reads, or a file inside it when it is a folder)."""
        if value is None and what != "component":  # tokenizers and the scheduler were not hashed before
            raise self.fail(field, f"the sha256 of every file of the {what} (an older package: re-export it)", value)
        files = self.obj(value, field)
        if not files:  # an empty map would skip the integrity check of what the runtime loads
            raise self.fail(field, f"the sha256 of every file of the {what}", files)
        for frel, digest in files.items():
            check_relative(frel, field)
            if not isinstance(digest, str) or len(digest) != 64 or any(c not in HEX_DIGITS for c in digest):
                raise self.fail(f"{field}[{frel!r}]", "a sha256 hex digest", digest)
        if not any(_covers(frel, covers) for frel in files):
            raise self.fail(field, f"a hash for {needed}", sorted(files))
        return dict(files)


def _check_chain(chunks, inputs, outputs, path: str, files: dict, where: str, f: Fields) -> None:
    """A chunk chain is runnable: the first chunk is `path`, every chunk's model is hashed, every chunk input is a
    component input or an earlier chunk's output (same shape and dtype), and the chain produces every output."""
    if chunks[0].path != path:
        raise f.fail(f"{where}.path", f"the first chunk's path {chunks[0].path!r}", path)
    paths = [c.path for c in chunks]
    if len(set(paths)) != len(paths):
        raise f.fail(f"{where}.chunks", "one distinct model file per chunk", paths)
    known = {s.name: s for s in inputs}
    for i, chunk in enumerate(chunks):
        if not any(_covers(frel, chunk.path) for frel in files):
            raise f.fail(f"{where}.files", f"a hash for chunk {i}'s model {chunk.path}", sorted(files))
        for s in chunk.inputs:
            if known.get(s.name) != s:
                expected = f"{s.name} from the inputs or an earlier chunk"
                raise f.fail(f"{where}.chunks[{i}].inputs", expected, s.to_dict())
        known.update({s.name: s for s in chunk.outputs})
    for s in outputs:
        if known.get(s.name) != s:
            raise f.fail(f"{where}.outputs", f"{s.name} produced by a chunk", s.to_dict())


def _extra(d: dict, cls) -> dict:
    """The keys of `d` that `cls` has no field for: kept as read, written back unchanged."""
    known = {f.name for f in fields(cls)} - {"extra", "name"}
    return {k: v for k, v in d.items() if k not in known}


def _without_none(d: dict, always: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in d.items() if v is not None or k in always}


@dataclass
class ChunkEntry:
    """One graph of a chunked component (`components.<name>.chunks[i]`): its model file and static I/O. The chunks
    run in order; each reads the component's inputs and earlier chunks' outputs by name."""

    path: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @classmethod
    def from_dict(cls, c: Any, where: str, f: Fields) -> ChunkEntry:
        c = f.obj(c, where)
        return cls(
            path=f.path(c.get("path"), f"{where}.path"),
            inputs=f.tensors(c.get("inputs"), f"{where}.inputs"),
            outputs=f.tensors(c.get("outputs"), f"{where}.outputs"),
        )

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
        }


def _tiling(t: Any, inputs, outputs, where: str, f: Fields) -> Tiling:
    """`components.<name>.tiling`: a component with one 4-D input and one 4-D output whose graph takes `tile`-sized
    pieces of the input (runtime/tiling.py); the tile fits the input, overlaps less than itself, starts aligned."""
    t = f.obj(t, f"{where}.tiling")
    if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 4 or len(outputs[0].shape) != 4:
        raise f.fail(f"{where}.tiling", "a component with one 4-D input and one 4-D output", t)
    full = inputs[0].shape[-2:]
    tile = t.get("tile")
    if not isinstance(tile, list) or len(tile) != 2:
        raise f.fail(f"{where}.tiling.tile", "[height, width]", tile)
    tile = tuple(f.integer(n, f"{where}.tiling.tile", 1, m) for n, m in zip(tile, full))
    overlap = f.integer(t.get("overlap"), f"{where}.tiling.overlap", 0, min(tile) - 1)
    align = f.integer(t.get("align", 1), f"{where}.tiling.align", 1, min(tile))
    if any(n % align for n in (*tile, *full)):
        raise f.fail(f"{where}.tiling.align", f"a divisor of the tile {list(tile)} and the input {list(full)}", align)
    return Tiling(tile, overlap, align)


@dataclass
class ComponentEntry:
    """One model of the package: `components.<name>` (`text_encoder`, `transformer`, `vae_decoder`, ...).

    A component too large for one graph (a true-size T5-XXL) is `chunks`: several graphs run in sequence, each
    small enough to export, quantize and load on its own; `path` is then its first chunk's model. A `tiling`
    component (a VAE exported with --vae-tile) has full-size `inputs` / `outputs` and a graph that takes one tile."""

    path: str  # the model file (ONNX / ORT) or folder (.mlpackage), relative to the package root
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict[str, str] = field(default_factory=dict)  # relpath -> sha256 of every file of the component's folder
    chunks: tuple[ChunkEntry, ...] = ()
    precision: str | None = None
    opset: int | None = None  # ONNX / ORT
    deployment_target: str | None = None  # Core ML
    function: str | None = None  # a multi-size program's function (Core ML) or method (ExecuTorch) for this size
    tolerance: dict | None = None
    gate_psnr_db: float | None = None
    ort_session_config: dict | None = None
    quantization: dict | None = None
    tiling: Tiling | None = None
    extra: dict = field(default_factory=dict)

    @property
    def folder(self) -> str:
        """The folder that holds the component's files (the writer hashes all of it)."""
        folders = [posixpath.dirname(posixpath.normpath(p)) or p for p in self.model_paths]
        return posixpath.commonpath(folders) if len(folders) > 1 else folders[0]

    @property
    def model_paths(self) -> list[str]:
        """Every model file the runtime opens: the chunks' in order, or the one `path`."""
        return [c.path for c in self.chunks] or [self.path]

    @classmethod
    def from_dict(cls, c: Any, name: str, f: Fields, where: str | None = None) -> ComponentEntry:
        where = where or f"components.{name}"
        c = f.obj(c, where)
        rel = f.path(c.get("path"), f"{where}.path")
        # A Core ML model is a folder (.mlpackage); its files are listed (and hashed) one by one in `files`.
        files = f.files(c.get("files"), f"{where}.files", rel, "component", f"the model file {rel}")
        opset = c.get("opset")
        if opset is not None:
            f.integer(opset, f"{where}.opset", 1, 1000)
        for key in ("tolerance", "ort_session_config", "quantization"):
            f.optional_obj(c.get(key), f"{where}.{key}")
        inputs, outputs = f.tensors(c.get("inputs"), f"{where}.inputs"), f.tensors(c.get("outputs"), f"{where}.outputs")
        chunks = ()
        if c.get("chunks") is not None:
            if not isinstance(c["chunks"], list) or not c["chunks"]:
                raise f.fail(f"{where}.chunks", "a non-empty list of chunks", c["chunks"])
            chunks = tuple(ChunkEntry.from_dict(x, f"{where}.chunks[{i}]", f) for i, x in enumerate(c["chunks"]))
            _check_chain(chunks, inputs, outputs, rel, files, where, f)
        tiling = None if c.get("tiling") is None else _tiling(c["tiling"], inputs, outputs, where, f)
        return cls(
            path=rel,
            files=files,
            chunks=chunks,
            precision=f.choice(c.get("precision"), f"{where}.precision", PRECISIONS, optional=True),
            opset=opset,
            deployment_target=f.string(c.get("deployment_target"), f"{where}.deployment_target", optional=True),
            function=f.string(c.get("function"), f"{where}.function", optional=True),
            inputs=inputs,
            outputs=outputs,
            tolerance=c.get("tolerance"),
            gate_psnr_db=f.number(c.get("gate_psnr_db"), f"{where}.gate_psnr_db", optional=True),
            ort_session_config=c.get("ort_session_config"),
            quantization=c.get("quantization"),
            tiling=tiling,
            extra=_extra(c, cls),
        )

    def to_dict(self) -> dict:
        return _without_none(
            {
                "path": self.path,
                "precision": self.precision,
                "opset": self.opset,
                "deployment_target": self.deployment_target,
                "function": self.function,
                "inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs],
                "chunks": [c.to_dict() for c in self.chunks] or None,
                "tolerance": self.tolerance,
                "gate_psnr_db": self.gate_psnr_db,
                "ort_session_config": self.ort_session_config,
                "quantization": self.quantization,
                "tiling": self.tiling.to_dict() if self.tiling else None,
                **self.extra,
                "files": dict(self.files),
            }
        )


@dataclass
class TokenizerEntry:
    """`text.<name>`: a tokenizer folder, its static length, pad id and the text encoder it feeds."""

    path: str  # folder with tokenizer.json (+ tokenizer_config.json ...), relative to the package root
    max_length: int
    pad_id: int
    component: str
    files: dict[str, str] = field(default_factory=dict)  # relpath -> sha256 of every file of the folder
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, t: Any, name: str, components, f: Fields) -> TokenizerEntry:
        where = f"text.{name}"
        t = f.obj(t, where)
        rel = f.path(t.get("path"), f"{where}.path")
        tokenizer_file = posixpath.join(rel, TOKENIZER_FILE)
        return cls(
            path=rel,
            max_length=f.integer(t.get("max_length"), f"{where}.max_length"),
            pad_id=f.integer(t.get("pad_id"), f"{where}.pad_id", 0, 1 << 24),
            component=f.choice(t.get("component"), f"{where}.component", components),
            files=f.files(t.get("files"), f"{where}.files", tokenizer_file, "tokenizer", tokenizer_file),
            extra=_extra(t, cls),
        )

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "max_length": self.max_length,
            "pad_id": self.pad_id,
            "component": self.component,
            **self.extra,
            "files": dict(self.files),
        }


@dataclass
class SchedulerEntry:
    """`scheduler`: the diffusers scheduler config file."""

    path: str = "scheduler/scheduler_config.json"
    files: dict[str, str] = field(default_factory=dict)  # {path: sha256}
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, s: Any, f: Fields) -> SchedulerEntry:
        s = f.obj(s, "scheduler")
        rel = f.path(s.get("path"), "scheduler.path")
        return cls(
            path=rel,
            files=f.files(s.get("files"), "scheduler.files", rel, "scheduler", f"the scheduler config {rel}"),
            extra=_extra(s, cls),
        )

    def to_dict(self) -> dict:
        return {"path": self.path, **self.extra, "files": dict(self.files)}


@dataclass
class VaeConfig:
    """`vae`: decode `latents / scaling_factor + shift_factor`."""

    scaling_factor: float
    shift_factor: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, v: Any, f: Fields) -> VaeConfig:
        v = f.obj(v, "vae")
        return cls(
            scaling_factor=f.number(v.get("scaling_factor"), "vae.scaling_factor"),
            shift_factor=f.number(v.get("shift_factor"), "vae.shift_factor", optional=True),
            extra=_extra(v, cls),
        )

    def to_dict(self) -> dict:
        return {"scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor, **self.extra}


def _bins(value: Any, f: Fields) -> dict[str, list[int]] | None:
    """`resolution_bins`: {ratio (height / width, as text): [height, width]}, or absent."""
    if value is None:
        return None
    bins = f.obj(value, "resolution_bins")
    for key, hw in bins.items():
        try:
            ok = float(key) > 0
        except ValueError:
            ok = False
        if not ok:
            raise f.fail(f"resolution_bins[{key!r}]", "a positive ratio (height / width) as the key", key)
        f.shape(hw, f"resolution_bins[{key!r}]", rank=2)
    return {str(k): [int(n) for n in v] for k, v in bins.items()} or None


def size_key(resolution: tuple[int, int]) -> str:
    """(height, width) -> "WxH", the name of a size in `sizes` and on the command line (`--size 192x320`)."""
    return f"{resolution[1]}x{resolution[0]}"


@dataclass
class SizeEntry:
    """`sizes.<WxH>`: one more image size of a multi-size package. The resolution-dependent components (transformer,
    VAE decoder and encoder) have their own static graphs for it; the others (text encoders) are the top level's."""

    resolution: tuple[int, int]  # [height, width]
    latent_shape: tuple[int, int, int]
    components: dict[str, ComponentEntry]
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, s: Any, key: str, known: dict, f: Fields) -> SizeEntry:
        where = f"sizes.{key}"
        s = f.obj(s, where)
        resolution = f.shape(s.get("resolution"), f"{where}.resolution", rank=2)
        if size_key(resolution) != key:
            raise f.fail(f"{where}.resolution", f"[height, width] of the size {key} (WIDTHxHEIGHT)", list(resolution))
        comps = f.obj(s.get("components"), f"{where}.components")
        unknown = [n for n in comps if n not in known]
        if not comps or unknown:
            raise f.fail(f"{where}.components", f"graphs of the top-level components ({', '.join(known)})", unknown)
        return cls(
            resolution=resolution,
            latent_shape=f.shape(s.get("latent_shape"), f"{where}.latent_shape", rank=3),
            components={
                n: ComponentEntry.from_dict(c, n, f, where=f"{where}.components.{n}") for n, c in comps.items()
            },
            extra=_extra(s, cls),
        )

    def to_dict(self) -> dict:
        return {
            "resolution": list(self.resolution),
            "latent_shape": list(self.latent_shape),
            "components": {n: c.to_dict() for n, c in self.components.items()},
            **self.extra,
        }


@dataclass
class Manifest:
    """manifest.json (docs/package.md). Built by the exporter and the quantizers, written by
    `export/package_writer.py` (which fills in every `files` map), read by `Manifest.from_dict`."""

    family: str
    resolution: tuple[int, int]
    batch: int
    latent_shape: tuple[int, int, int]
    vae: VaeConfig
    transformer_out_channels: int
    text: dict[str, TokenizerEntry]  # tokenizer name -> entry, in manifest order
    components: dict[str, ComponentEntry]
    scheduler: SchedulerEntry = field(default_factory=SchedulerEntry)
    schema_version: int = SCHEMA_VERSION
    source: str | None = None
    architecture: str | None = None
    edit_config: Any = None  # information only
    target: str | None = None
    export: dict | None = None  # information only: per component, how it was exported
    tools: dict = field(default_factory=dict)  # information only: versions
    validation: Any = None  # null, or the last `edit-mobile validate` report
    quantization: dict | None = None  # after `edit-mobile quantize`
    sizes: dict[str, SizeEntry] = field(default_factory=dict)  # "WxH" -> the other sizes of a multi-size package
    resolution_bins: dict[str, list[int]] | None = None  # PixArt-Σ: the model's aspect-ratio buckets (binning.py)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, m: Any, where: str | Path = MANIFEST) -> Manifest:
        """Check every field of a parsed manifest.json; UserError (one line naming the field) on the first bad one."""
        f = Fields(where)
        if not isinstance(m, dict):
            raise UserError(f"{where}: expected a JSON object")
        version = m.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(
                f"package schema_version {version!r} is not supported (this edit-mobile reads version "
                f"{SCHEMA_VERSION}); re-export the package with this version"
            )
        missing = [k for k in REQUIRED if k not in m]
        if missing:
            raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
        family = f.choice(m["family"], "family", FAMILIES)
        if not f.obj(m["components"], "components"):
            raise f.fail("components", "a non-empty object", m["components"])
        components = {name: ComponentEntry.from_dict(c, name, f) for name, c in m["components"].items()}
        entries = m["text"]
        if isinstance(entries, list):  # older manifests: a list of entries named by their folder
            entries = {(t.get("path") if isinstance(t, dict) else None) or str(i): t for i, t in enumerate(entries)}
        if not f.obj(entries, "text"):
            raise f.fail("text", "one tokenizer entry per text encoder", entries)
        text = {str(name): TokenizerEntry.from_dict(t, name, components, f) for name, t in entries.items()}
        scheduler = SchedulerEntry.from_dict(m["scheduler"], f)
        vae = VaeConfig.from_dict(m["vae"], f)
        for key in ("tools", "export", "quantization"):
            f.optional_obj(m.get(key), key)
        sizes = {
            str(k): SizeEntry.from_dict(v, str(k), components, f)
            for k, v in (f.optional_obj(m.get("sizes"), "sizes") or {}).items()
        }
        manifest = cls(
            schema_version=version,
            source=f.string(m.get("source"), "source", optional=True),
            family=family,
            architecture=f.string(m.get("architecture"), "architecture", optional=True),
            edit_config=m.get("edit_config"),
            target=f.choice(m.get("target"), "target", TARGETS, optional=True),
            resolution=f.shape(m["resolution"], "resolution", rank=2),
            batch=f.integer(m["batch"], "batch", 1, 64),
            latent_shape=f.shape(m["latent_shape"], "latent_shape", rank=3),
            vae=vae,
            transformer_out_channels=f.integer(m["transformer_out_channels"], "transformer_out_channels"),
            text=text,
            scheduler=scheduler,
            components=components,
            export=m.get("export"),
            tools=dict(m.get("tools") or {}),
            validation=m.get("validation"),
            quantization=m.get("quantization"),
            sizes=sizes,
            resolution_bins=_bins(m.get("resolution_bins"), f),
            extra=_extra(m, cls),
        )
        if size_key(manifest.resolution) in sizes:
            raise f.fail(f"sizes.{size_key(manifest.resolution)}", "a size other than the top-level resolution", "")
        manifest.check_consistent(f)
        for key in manifest.sizes:
            manifest.at_size(key).check_consistent(Fields(f"{where} (size {key})"))
        return manifest

    def all_entries(self) -> list[ComponentEntry]:
        """Every component entry: the top level's and each further size's."""
        return [*self.components.values(), *(c for s in self.sizes.values() for c in s.components.values())]

    @property
    def size_keys(self) -> list[str]:
        """Every image size of the package as "WxH", the top-level (default) size first."""
        return [size_key(self.resolution), *self.sizes]

    def at_size(self, key: str) -> Manifest:
        """The single-size manifest of size `key` ("WxH"): its resolution, latent shape and graphs, the shared
        components (text encoders) of the top level. UserError naming the sizes for one the package lacks."""
        if key == size_key(self.resolution):
            return replace(self, sizes={})
        if key not in self.sizes:
            raise UserError(f"the package has no size {key}; it has {', '.join(self.size_keys)} (WIDTHxHEIGHT)")
        s = self.sizes[key]
        components = {n: s.components.get(n, c) for n, c in self.components.items()}
        return replace(self, resolution=s.resolution, latent_shape=s.latent_shape, components=components, sizes={})

    def check_consistent(self, f: Fields) -> None:
        """The top-level sizes agree with the graphs' static shapes (the runtime allocates from the former)."""

        def spec(component: str, name: str, outputs: bool = False) -> TensorSpec | None:
            comp = self.components.get(component)
            specs = (comp.outputs if outputs else comp.inputs) if comp else ()
            return next((s for s in specs if s.name == name), None)

        sample, out = spec("transformer", "sample"), spec("transformer", "out_sample", outputs=True)
        if sample is not None and (
            sample.shape[0] != self.batch or tuple(sample.shape[1:]) != tuple(self.latent_shape)
        ):
            raise f.fail(
                "batch / latent_shape",
                f"the transformer's sample shape {list(sample.shape)}",
                [self.batch, *self.latent_shape],
            )
        if out is not None and out.shape[1] != self.transformer_out_channels:
            raise f.fail(
                "transformer_out_channels",
                f"{out.shape[1]} (the transformer's out_sample)",
                self.transformer_out_channels,
            )
        image = spec("vae_decoder", "sample", outputs=True)
        if image is not None and tuple(image.shape[2:]) != tuple(self.resolution):
            raise f.fail("resolution", f"the VAE decoder's image size {list(image.shape[2:])}", list(self.resolution))
        for name, t in self.text.items():
            ids = spec(t.component, "input_ids")
            if ids is not None and ids.shape[-1] != t.max_length:
                raise f.fail(f"text.{name}.max_length", f"{ids.shape[-1]} ({t.component}'s input_ids)", t.max_length)

    def to_dict(self) -> dict:
        """The JSON form (docs/package.md); free-form fields are deep-copied."""
        d = _without_none(
            {
                "schema_version": self.schema_version,
                "source": self.source,
                "family": self.family,
                "architecture": self.architecture,
                "edit_config": self.edit_config,
                "target": self.target,
                "resolution": list(self.resolution),
                "batch": self.batch,
                "latent_shape": list(self.latent_shape),
                "vae": self.vae.to_dict(),
                "transformer_out_channels": self.transformer_out_channels,
                "text": {name: t.to_dict() for name, t in self.text.items()},
                "scheduler": self.scheduler.to_dict(),
                "components": {name: c.to_dict() for name, c in self.components.items()},
                "export": self.export,
                "tools": dict(self.tools),
                "validation": self.validation,
                "quantization": self.quantization,
                "sizes": {k: v.to_dict() for k, v in self.sizes.items()} or None,
                "resolution_bins": self.resolution_bins,
                **self.extra,
            },
            always=("source", "architecture", "edit_config", "target", "validation"),
        )
        return copy.deepcopy(d)

    def listed_files(self) -> list[tuple[str, str, str]]:
        """Every hashed file as (the manifest field that lists it, relpath, sha256): components, tokenizers,
        scheduler."""
        out = [(f"components.{n}.files", rel, d) for n, c in self.components.items() for rel, d in c.files.items()]
        out += [
            (f"sizes.{k}.components.{n}.files", rel, d)
            for k, size in self.sizes.items()
            for n, c in size.components.items()
            for rel, d in c.files.items()
        ]
        out += [(f"text.{n}.files", rel, d) for n, t in self.text.items() for rel, d in t.files.items()]
        out += [("scheduler.files", rel, d) for rel, d in self.scheduler.files.items()]
        return out

    def save(self, root: str | Path) -> Path:
        """Write `root/manifest.json` atomically (a temporary file, fsync, then os.replace); returns its path.

        On any error (also a field that is not JSON-serialisable) the previous manifest.json stays as it was."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"  # fails before anything is written
        return write_file_atomic(Path(root) / MANIFEST, lambda f: f.write(text.encode("utf-8")))
