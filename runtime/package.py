"""Load and verify an artifact package (docs/package.md): manifest, paths that stay inside, sha256 of every file.

No torch here: this is the first thing the on-device runtime runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError
from .io_specs import DTYPE_NAMES, TensorSpec

SCHEMA_VERSION = 1
FAMILIES = ("pixart", "sd3")
TARGETS = ("onnx", "ort-mobile", "coreml")
MANIFEST = "manifest.json"
_REQUIRED = (
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
_MAX_DIM = 1 << 16
_MAX_ELEMENTS = 1 << 31


def installed_version(name: str) -> str | None:
    """The installed version of a distribution (recorded in manifests and benchmark reports), None if absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Component:
    """One model of the package (`text_encoder`, `transformer`, `vae_decoder`, ...)."""

    name: str
    path: Path  # absolute, verified inside the package
    relpath: str
    files: dict[str, str]  # relpath (from the package root) -> sha256 hex
    precision: str | None
    opset: int | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerance: dict
    raw: dict = field(repr=False)

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]


@dataclass(frozen=True)
class TextSpec:
    """One tokenizer: folder, static length, pad id and the text encoder it feeds."""

    name: str
    path: Path  # absolute tokenizer folder
    max_length: int
    pad_id: int
    component: str


@dataclass
class Package:
    root: Path
    manifest: dict
    schema_version: int
    source: str | None
    family: str
    architecture: str | None
    target: str | None
    resolution: tuple[int, int]
    batch: int
    latent_shape: tuple[int, int, int]
    vae: dict
    transformer_out_channels: int
    text: dict[str, TextSpec]  # tokenizer name -> spec, in manifest order
    scheduler_path: Path
    components: dict[str, Component]
    tools: dict
    validation: Any

    # --- helpers -----------------------------------------------------------------------------------------------
    def component(self, name: str) -> Component:
        if name not in self.components:
            raise UserError(f"package {self.root} has no component {name!r} (it has: {', '.join(self.components)})")
        return self.components[name]

    def component_path(self, name: str) -> Path:
        return self.component(name).path

    def input_specs(self, name: str) -> list[TensorSpec]:
        return list(self.component(name).inputs)

    def output_names(self, name: str) -> list[str]:
        return self.component(name).output_names

    def text_for(self, component: str) -> TextSpec:
        """The tokenizer spec that feeds text encoder `component`."""
        for spec in self.text.values():
            if spec.component == component:
                return spec
        raise UserError(f"package {self.root}: no tokenizer in manifest 'text' feeds component {component!r}")

    def scheduler_config(self) -> dict:
        return _read_json(self.scheduler_path, f"scheduler config {self.scheduler_path}")

    @property
    def height(self) -> int:
        return self.resolution[0]

    @property
    def width(self) -> int:
        return self.resolution[1]

    def verify(self) -> None:
        """Check every listed file's sha256 (raises UserError on a missing or modified file)."""
        for comp in self.components.values():
            for rel, digest in comp.files.items():
                path = resolve_inside(self.root, rel, f"components.{comp.name}.files")
                if not path.is_file():
                    raise UserError(f"package {self.root} is incomplete: {rel} is missing")
                if sha256_file(path) != str(digest).lower():
                    raise UserError(f"sha256 mismatch for {rel}: the package is corrupted or was modified")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_inside(root: Path, rel: str, what: str) -> Path:
    """`root / rel` resolved (symlinks followed); UserError if it is absolute or leaves the package folder."""
    if not isinstance(rel, str) or not rel:
        raise UserError(f"manifest {what}: expected a relative path, got {rel!r}")
    root = root.resolve()
    path = (root / rel).resolve()
    if Path(rel).is_absolute() or not path.is_relative_to(root):
        raise UserError(f"manifest {what}: path {rel!r} leaves the package folder; refusing it")
    return path


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{what} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} is not valid JSON: {e}") from None


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"package folder {root} does not exist")
    if not (root / MANIFEST).is_file():
        raise UserError(f"not an edit-mobile package: manifest.json missing in {root}")
    manifest = _read_json(root / MANIFEST, f"{root / MANIFEST}")
    if not isinstance(manifest, dict):
        raise UserError(f"{root / MANIFEST}: expected a JSON object")
    return manifest


class _Fields:
    """Typed reads of manifest fields: each violation is a UserError naming the field and what was expected."""

    def __init__(self, manifest_path: Path):
        self.where = manifest_path

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

    def integer(self, value: Any, field: str, low: int = 1, high: int = _MAX_DIM) -> int:
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
        if math.prod(dims) > _MAX_ELEMENTS:
            raise self.fail(field, f"at most {_MAX_ELEMENTS} elements", value)
        return dims

    def choice(self, value: Any, field: str, choices, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or value not in choices:
            raise self.fail(field, f"one of {', '.join(sorted(choices))}", value)
        return value

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


def _component(root: Path, name: str, c: Any, f: _Fields) -> Component:
    where = f"components.{name}"
    c = f.obj(c, where)
    rel = f.string(c.get("path"), f"{where}.path")
    path = resolve_inside(root, rel, f"{where}.path")
    files = f.obj(c.get("files"), f"{where}.files")
    if not files:  # an empty map would skip the integrity check of the model the runtime loads
        raise f.fail(f"{where}.files", "the sha256 of every file of the component", files)
    for frel, digest in files.items():
        resolve_inside(root, frel, f"{where}.files")
        if not isinstance(digest, str) or len(digest) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in digest):
            raise f.fail(f"{where}.files[{frel!r}]", "a sha256 hex digest", digest)
    # A Core ML model is a folder (.mlpackage); its files are listed (and hashed) one by one in `files`.
    if not any(
        resolve_inside(root, frel, f"{where}.files") == path
        or resolve_inside(root, frel, f"{where}.files").is_relative_to(path)
        for frel in files
    ):
        raise f.fail(f"{where}.files", f"a hash for the model file {rel}", sorted(files))
    if not (path.is_file() or (path.suffix == ".mlpackage" and path.is_dir())):
        raise UserError(f"package {root} is incomplete: {rel} is missing")
    opset = c.get("opset")
    if opset is not None:
        f.integer(opset, f"{where}.opset", 1, 1000)
    for key in ("tolerance", "ort_session_config", "quantization"):
        if c.get(key) is not None:
            f.obj(c[key], f"{where}.{key}")
    if c.get("gate_psnr_db") is not None:
        f.number(c["gate_psnr_db"], f"{where}.gate_psnr_db")
    return Component(
        name=name,
        path=path,
        relpath=rel,
        files=dict(files),
        precision=f.string(c.get("precision"), f"{where}.precision", optional=True),
        opset=opset,
        inputs=f.tensors(c.get("inputs"), f"{where}.inputs"),
        outputs=f.tensors(c.get("outputs"), f"{where}.outputs"),
        tolerance=dict(c.get("tolerance") or {}),
        raw=c,
    )


def _text(root: Path, m: dict, components: dict[str, Component], f: _Fields) -> dict[str, TextSpec]:
    entries = m["text"]
    if isinstance(entries, list):  # older manifests: a list of entries named by their folder
        entries = {(t.get("path") if isinstance(t, dict) else None) or str(i): t for i, t in enumerate(entries)}
    if not f.obj(entries, "text"):
        raise f.fail("text", "one tokenizer entry per text encoder", entries)
    text: dict[str, TextSpec] = {}
    for tname, t in entries.items():
        where = f"text.{tname}"
        t = f.obj(t, where)
        rel = f.string(t.get("path"), f"{where}.path")
        spec = TextSpec(
            name=str(tname),
            path=resolve_inside(root, rel, f"{where}.path"),
            max_length=f.integer(t.get("max_length"), f"{where}.max_length"),
            pad_id=f.integer(t.get("pad_id"), f"{where}.pad_id", 0, 1 << 24),
            component=f.choice(t.get("component"), f"{where}.component", components),
        )
        if not (spec.path / "tokenizer.json").is_file():
            raise UserError(f"package {root} is incomplete: {rel}/tokenizer.json is missing")
        text[spec.name] = spec
    return text


def _check_consistent(pkg: Package, f: _Fields) -> None:
    """The top-level sizes agree with the graphs' static shapes (the runtime allocates from the former)."""

    def spec(component: str, name: str, outputs: bool = False) -> TensorSpec | None:
        comp = pkg.components.get(component)
        specs = (comp.outputs if outputs else comp.inputs) if comp else ()
        return next((s for s in specs if s.name == name), None)

    sample, out = spec("transformer", "sample"), spec("transformer", "out_sample", outputs=True)
    if sample is not None and (sample.shape[0] != pkg.batch or sample.shape[1:] != pkg.latent_shape):
        raise f.fail(
            "batch / latent_shape",
            f"the transformer's sample shape {list(sample.shape)}",
            [pkg.batch, *pkg.latent_shape],
        )
    if out is not None and out.shape[1] != pkg.transformer_out_channels:
        raise f.fail(
            "transformer_out_channels", f"{out.shape[1]} (the transformer's out_sample)", pkg.transformer_out_channels
        )
    image = spec("vae_decoder", "sample", outputs=True)
    if image is not None and tuple(image.shape[2:]) != pkg.resolution:
        raise f.fail("resolution", f"the VAE decoder's image size {list(image.shape[2:])}", list(pkg.resolution))
    for t in pkg.text.values():
        ids = spec(t.component, "input_ids")
        if ids is not None and ids.shape[-1] != t.max_length:
            raise f.fail(f"text.{t.name}.max_length", f"{ids.shape[-1]} ({t.component}'s input_ids)", t.max_length)


def load_package(root: str | Path, verify: bool = True) -> Package:
    """Read `root/manifest.json`, check every field, the paths and (with `verify`) every file's sha256."""
    root = Path(root)
    m = read_manifest(root)
    f = _Fields(root / MANIFEST)
    version = m.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(
            f"package schema_version {version!r} is not supported (this edit-mobile reads version "
            f"{SCHEMA_VERSION}); re-export the package with this version"
        )
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise UserError(f"{root / MANIFEST}: missing field(s) {', '.join(missing)}")
    family = f.choice(m["family"], "family", FAMILIES)
    if not f.obj(m["components"], "components"):
        raise f.fail("components", "a non-empty object", m["components"])
    components = {name: _component(root, name, c, f) for name, c in m["components"].items()}
    text = _text(root, m, components, f)
    sched_rel = f.string(f.obj(m["scheduler"], "scheduler").get("path"), "scheduler.path")
    sched = resolve_inside(root, sched_rel, "scheduler.path")
    if not sched.is_file():
        raise UserError(f"package {root} is incomplete: {sched_rel} is missing")
    vae = f.obj(m["vae"], "vae")
    f.number(vae.get("scaling_factor"), "vae.scaling_factor")
    f.number(vae.get("shift_factor"), "vae.shift_factor", optional=True)
    for key in ("tools", "export"):
        if m.get(key) is not None:
            f.obj(m[key], key)

    pkg = Package(
        root=root.resolve(),
        manifest=m,
        schema_version=version,
        source=f.string(m.get("source"), "source", optional=True),
        family=family,
        architecture=f.string(m.get("architecture"), "architecture", optional=True),
        target=f.choice(m.get("target"), "target", TARGETS, optional=True),
        resolution=f.shape(m["resolution"], "resolution", rank=2),
        batch=f.integer(m["batch"], "batch", 1, 64),
        latent_shape=f.shape(m["latent_shape"], "latent_shape", rank=3),
        vae=dict(vae),
        transformer_out_channels=f.integer(m["transformer_out_channels"], "transformer_out_channels"),
        text=text,
        scheduler_path=sched,
        components=components,
        tools=dict(m.get("tools") or {}),
        validation=m.get("validation"),
    )
    _check_consistent(pkg, f)
    if verify:
        pkg.verify()
    return pkg


def write_validation(root: str | Path | Package, report: Any) -> None:
    """Store `report` as the manifest's `validation` field, atomically (manifest.json.tmp, then os.replace).

    manifest.json itself is not listed in any component's `files`, so this leaves every hash valid.
    """
    pkg = root if isinstance(root, Package) else None
    root = pkg.root if pkg else Path(root)
    manifest = read_manifest(root)
    manifest["validation"] = report
    final = root / MANIFEST
    tmp = root / (MANIFEST + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {final}: {e.strerror}") from None
    except BaseException:  # e.g. a report that is not JSON-serialisable: leave the old manifest as it was
        tmp.unlink(missing_ok=True)
        raise
    if pkg is not None:
        pkg.manifest = manifest
        pkg.validation = report


def parse_resolution(text: str) -> tuple[int, int]:
    """'256' or '256x384' (height x width) -> (height, width)."""
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise UserError(f"--resolution must be N or HxW in pixels, got {text!r}")
    return parts[0], parts[1]
