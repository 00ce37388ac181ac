"""The one writer of artifact packages (docs/package.md): `edit-mobile export` and both quantizers (ONNX and
Core ML) write their packages through it.

    with write_package(out, overwrite) as writer:
        writer.copy_from(source_package, skip_components=[...])  # quantizers: the files they do not replace
        ... write model files, tokenizers, the scheduler config under writer.root ...
        manifest = writer.finish(manifest)

The package is built in a temporary folder next to `out` (runtime/atomic.py). `finish` hashes every file the
manifest lists (each component's folder, each tokenizer folder, the scheduler config), writes manifest.json last
and loads the result with the runtime's own loader; only a package that passed it is renamed to `out`. A block
that ends without `finish`, or with an error, leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..runtime.atomic import atomic_output_dir
from ..runtime.manifest import MANIFEST, Manifest
from ..runtime.package import Package, load_package, sha256_file


class PackageWriter:
    """Files go under `root` (the temporary folder); `finish(manifest)` completes the package."""

    def __init__(self, root: Path):
        self.root = root
        self.manifest: Manifest | None = None
        self._digests: dict[Path, str] = {}  # a multi-size package lists a component's folder once per size

    def _sha256(self, path: Path) -> str:
        if path not in self._digests:
            self._digests[path] = sha256_file(path)
        return self._digests[path]

    def copy_from(self, source: Package, skip_components: Iterable[str] = ()) -> None:
        """Copy everything of the package `source` except manifest.json and the top-level folders of
        `skip_components` (the components about to be replaced)."""
        skip = {Path(source.components[name].relpath).parts[0] for name in skip_components}
        for item in source.root.iterdir():
            if item.name in skip or item.name in (MANIFEST, MANIFEST + ".tmp"):
                continue
            if item.is_dir():
                shutil.copytree(item, self.root / item.name)
            else:
                shutil.copy2(item, self.root / item.name)

    def hashes(self, rel: str) -> dict[str, str]:
        """{relpath: sha256} of the file `rel`, or of every file under the folder `rel`."""
        path = self.root / rel
        if path.is_file():
            return {rel: self._sha256(path)}
        if not path.is_dir():
            raise RuntimeError(f"package writer: the manifest lists {rel}, which was not written")
        return {f.relative_to(self.root).as_posix(): self._sha256(f) for f in sorted(path.rglob("*")) if f.is_file()}

    def finish(self, manifest: Manifest) -> Manifest:
        """Fill in every `files` map from the files under `root`, write manifest.json (last) and check the package
        with `load_package`; returns the manifest as written."""
        if self.manifest is not None:
            raise RuntimeError("package writer: finish() was already called")
        m = copy.deepcopy(manifest)
        for entry in m.all_entries():
            entry.files = self.hashes(entry.folder)
        for entry in m.text.values():
            entry.files = self.hashes(entry.path)
        m.scheduler.files = self.hashes(m.scheduler.path)
        m.save(self.root)
        load_package(self.root, verify=False)  # a writer bug shows here, not on the device
        self.manifest = m
        return m


@contextlib.contextmanager
def write_package(out: str | Path, overwrite: bool = False) -> Iterator[PackageWriter]:
    """A `PackageWriter` on a temporary folder that becomes `out` when the block ends after `finish`."""
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = PackageWriter(tmp)
        yield writer
        if writer.manifest is None:
            raise RuntimeError("package writer: the block ended without finish(); no package was written")
