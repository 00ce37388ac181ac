"""Load and verify an artifact package (docs/package.md): manifest, paths that stay inside, sha256 of every file.

No torch here: this is the first thing the on-device runtime runs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .binning import classify
from .errors import UserError
from .io_specs import TensorSpec
from .manifest import MANIFEST, TOKENIZER_FILE, ComponentEntry, Manifest, check_relative, size_key


def installed_version(name: str) -> str | None:
    """The installed version of a distribution (recorded in manifests and benchmark reports), None if absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class Component:
    """One model of the package (`text_encoder`, `transformer`, `vae_decoder`, ...): its manifest entry and the
    model's absolute path, verified inside the package."""

    name: str
    path: Path  # absolute, verified inside the package
    entry: ComponentEntry = field(repr=False)
    chunk_paths: tuple[Path, ...] = ()  # a chunked component's graphs, in order (absolute, verified)

    @property
    def relpath(self) -> str:
        return self.entry.path

    @property
    def files(self) -> dict[str, str]:  # relpath (from the package root) -> sha256 hex
        return self.entry.files

    @property
    def precision(self) -> str | None:
        return self.entry.precision

    @property
    def opset(self) -> int | None:
        return self.entry.opset

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.entry.inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.entry.outputs

    @property
    def tolerance(self) -> dict:
        return dict(self.entry.tolerance or {})

    @property
    def raw(self) -> dict:
        """The entry as written in manifest.json."""
        return self.entry.to_dict()

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
    """A loaded package: its checked manifest (`runtime/manifest.py`) and the absolute paths of what it lists."""

    root: Path
    manifest: Manifest
    text: dict[str, TextSpec]  # tokenizer name -> spec, in manifest order
    scheduler_path: Path
    components: dict[str, Component]

    # --- manifest fields ---------------------------------------------------------------------------------------
    @property
    def schema_version(self) -> int:
        return self.manifest.schema_version

    @property
    def source(self) -> str | None:
        return self.manifest.source

    @property
    def family(self) -> str:
        return self.manifest.family

    @property
    def architecture(self) -> str | None:
        return self.manifest.architecture

    @property
    def target(self) -> str | None:
        return self.manifest.target

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.manifest.resolution)

    @property
    def batch(self) -> int:
        return self.manifest.batch

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest.latent_shape)

    @property
    def vae(self) -> dict:
        return self.manifest.vae.to_dict()

    @property
    def transformer_out_channels(self) -> int:
        return self.manifest.transformer_out_channels

    @property
    def tools(self) -> dict:
        return dict(self.manifest.tools)

    @property
    def validation(self) -> Any:
        return self.manifest.validation

    @property
    def sizes(self) -> list[str]:
        """The image sizes this package has graphs for, as "WxH" (WIDTHxHEIGHT), the default first."""
        return self.manifest.size_keys

    def at_size(self, size: str | tuple[int, int] | None) -> Package:
        """This package at image size `size` ("WxH" or (height, width); None: the default size): the graphs of that
        size and the shared components, as a single-size package. UserError listing the sizes for one it lacks."""
        key = size_key(size) if isinstance(size, tuple) else size or self.sizes[0]
        manifest = self.manifest.at_size(key)
        components = _components(self.root, manifest.components, f"sizes.{key}.components")
        return replace(self, manifest=manifest, components=components)

    def require_one_size(self, what: str) -> None:
        """UserError in one line when this is a multi-size package and `what` handles one size only."""
        if self.manifest.sizes:
            raise UserError(
                f"{self.root} has {len(self.sizes)} sizes ({', '.join(self.sizes)}): {what} of multi-size packages "
                "is not supported yet; use a one-size export"
            )

    def generation_size(self, size: tuple[int, int] | None) -> tuple[str, tuple[int, int] | None]:
        """Where to generate an image of `size` (height, width; None: the default size): (the package's size "WxH",
        None) when it has that size; for a PixArt-Σ package, (the bucket diffusers bins it to, `size` to resize the
        image to) when that bucket is one of its sizes (runtime/binning.py). UserError otherwise."""
        if size is None:
            return self.sizes[0], None
        key, bins = size_key(size), self.manifest.resolution_bins
        if key in self.sizes or not bins:
            self.manifest.at_size(key)  # UserError naming the package's sizes when it lacks this one
            return key, None
        bucket = size_key(classify(*size, bins))
        if bucket not in self.sizes:
            raise UserError(
                f"{size_key(size)} bins to {bucket} (PixArt-Σ's aspect-ratio buckets, as diffusers bins sizes), which "
                f"the package lacks; it has {', '.join(self.sizes)} (export it with --resolution {bucket})"
            )
        return bucket, tuple(size)

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
        """Check the sha256 of every listed file: components, tokenizers, scheduler (UserError on a missing or
        modified file)."""
        # A weights file that several sizes' graphs share is listed once per graph: hash it once.
        for what, rel, digest in dict(((r, d), (w, r, d)) for w, r, d in self.manifest.listed_files()).values():
            path = resolve_inside(self.root, rel, what)
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
    check_relative(rel, what)
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


def _components(root: Path, entries: dict[str, ComponentEntry], where: str) -> dict[str, Component]:
    components = {}
    for name, entry in entries.items():
        paths = []
        for rel in entry.model_paths:
            path = resolve_inside(root, rel, f"{where}.{name}.path")
            if not (path.is_file() or (path.suffix == ".mlpackage" and path.is_dir())):
                raise UserError(f"package {root} is incomplete: {rel} is missing")
            paths.append(path)
        chunks = tuple(paths) if entry.chunks else ()
        components[name] = Component(name=name, path=paths[0], entry=entry, chunk_paths=chunks)
    return components


def load_package(root: str | Path, verify: bool = True) -> Package:
    """Read `root/manifest.json`, check every field (`Manifest.from_dict`), that every path stays inside the package
    (symlinks followed) and exists, and (with `verify`) every listed file's sha256."""
    root = Path(root)
    manifest = Manifest.from_dict(read_manifest(root), root / MANIFEST)
    for what, rel, _ in manifest.listed_files():
        resolve_inside(root, rel, what)
    components = _components(root, manifest.components, "components")
    for key, size in manifest.sizes.items():
        _components(root, size.components, f"sizes.{key}.components")  # every size's graphs exist
    text = {}
    for name, t in manifest.text.items():
        spec = TextSpec(
            name=name,
            path=resolve_inside(root, t.path, f"text.{name}.path"),
            max_length=t.max_length,
            pad_id=t.pad_id,
            component=t.component,
        )
        if not (spec.path / TOKENIZER_FILE).is_file():
            raise UserError(f"package {root} is incomplete: {t.path}/{TOKENIZER_FILE} is missing")
        text[name] = spec
    sched = resolve_inside(root, manifest.scheduler.path, "scheduler.path")
    if not sched.is_file():
        raise UserError(f"package {root} is incomplete: {manifest.scheduler.path} is missing")
    pkg = Package(root=root.resolve(), manifest=manifest, text=text, scheduler_path=sched, components=components)
    if verify:
        pkg.verify()
    return pkg


def write_validation(root: str | Path | Package, report: Any) -> None:
    """Store `report` as the manifest's `validation` field, atomically (`Manifest.save`).

    manifest.json itself is not listed in any `files` map, so this leaves every hash valid."""
    pkg = root if isinstance(root, Package) else None
    root = pkg.root if pkg else Path(root)
    # Read from disk: `pkg` may be one size's view of a multi-size package (Package.at_size).
    manifest = Manifest.from_dict(read_manifest(root), root / MANIFEST)
    replace(manifest, validation=report).save(root)
    if pkg is not None:
        pkg.manifest = replace(pkg.manifest, validation=report)


def parse_resolution(text: str) -> tuple[int, int]:
    """'256' or '192x320' (WIDTHxHEIGHT, as image sizes are written: 192 wide, 320 high) -> (height, width)."""
    try:
        parts = [int(p) for p in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise UserError(f"an image size must be N or WIDTHxHEIGHT in pixels, got {text!r}")
    return parts[1], parts[0]
