"""Load and verify an artifact package (docs/package.md): manifest, paths that stay inside, sha256 of every file.

No torch here: this is the first thing the on-device runtime runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

SCHEMA_VERSION = 1
FAMILIES = ("pixart", "sd3")
MANIFEST = "manifest.json"
_REQUIRED = ("schema_version", "family", "resolution", "batch", "latent_shape", "vae", "transformer_out_channels",
             "text", "scheduler", "components")


def installed_version(name: str) -> str | None:
    """The installed version of a distribution (recorded in manifests and benchmark reports), None if absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class TensorSpec:
    """One static input or output of a component: name, shape, dtype name as written in the manifest."""

    name: str
    shape: tuple
    dtype: str

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(name=str(d["name"]), shape=tuple(d["shape"]), dtype=str(d["dtype"]))


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


def load_package(root: str | Path, verify: bool = True) -> Package:
    """Read `root/manifest.json`, check schema, paths and (with `verify`) every file's sha256."""
    root = Path(root)
    m = read_manifest(root)
    version = m.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"package schema_version {version!r} is not supported (this edit-mobile reads version "
                        f"{SCHEMA_VERSION}); re-export the package with this version")
    missing = [k for k in _REQUIRED if k not in m]
    if missing:
        raise UserError(f"{root / MANIFEST}: missing field(s) {', '.join(missing)}")
    if m["family"] not in FAMILIES:
        raise UserError(f"{root / MANIFEST}: unknown family {m['family']!r} (expected one of {', '.join(FAMILIES)})")

    components: dict[str, Component] = {}
    if not isinstance(m["components"], dict) or not m["components"]:
        raise UserError(f"{root / MANIFEST}: 'components' must be a non-empty object")
    for name, c in m["components"].items():
        try:
            rel = c["path"]
            files = dict(c.get("files") or {})
            inputs = tuple(TensorSpec.from_dict(s) for s in c.get("inputs", []))
            outputs = tuple(TensorSpec.from_dict(s) for s in c.get("outputs", []))
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{root / MANIFEST}: malformed components.{name}: {e!r}") from None
        path = resolve_inside(root, rel, f"components.{name}.path")
        for frel in files:
            resolve_inside(root, frel, f"components.{name}.files")
        # A Core ML model is a folder (.mlpackage); its files are listed (and hashed) one by one in `files`.
        if not (path.is_file() or (path.suffix == ".mlpackage" and path.is_dir())):
            raise UserError(f"package {root} is incomplete: {rel} is missing")
        components[name] = Component(name=name, path=path, relpath=rel, files=files, precision=c.get("precision"),
                                     opset=c.get("opset"), inputs=inputs, outputs=outputs,
                                     tolerance=dict(c.get("tolerance") or {}), raw=c)

    text: dict[str, TextSpec] = {}
    entries = m["text"].items() if isinstance(m["text"], dict) else ((t.get("path"), t) for t in m["text"])
    for tname, t in entries:
        try:
            tpath = resolve_inside(root, t["path"], f"text.{tname}.path")
            spec = TextSpec(name=str(tname), path=tpath, max_length=int(t["max_length"]), pad_id=int(t["pad_id"]),
                            component=str(t["component"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{root / MANIFEST}: malformed text.{tname}: {e!r}") from None
        if not (tpath / "tokenizer.json").is_file():
            raise UserError(f"package {root} is incomplete: {t['path']}/tokenizer.json is missing")
        text[spec.name] = spec

    try:
        sched_rel = m["scheduler"]["path"]
    except (KeyError, TypeError):
        raise UserError(f"{root / MANIFEST}: 'scheduler' must be {{\"path\": ...}}") from None
    sched = resolve_inside(root, sched_rel, "scheduler.path")
    if not sched.is_file():
        raise UserError(f"package {root} is incomplete: {sched_rel} is missing")

    pkg = Package(
        root=root.resolve(), manifest=m, schema_version=version, source=m.get("source"), family=m["family"],
        architecture=m.get("architecture"), target=m.get("target"),
        resolution=tuple(int(v) for v in m["resolution"]), batch=int(m["batch"]),
        latent_shape=tuple(int(v) for v in m["latent_shape"]), vae=dict(m["vae"]),
        transformer_out_channels=int(m["transformer_out_channels"]), text=text, scheduler_path=sched,
        components=components, tools=dict(m.get("tools") or {}), validation=m.get("validation"),
    )
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
