"""One copy of the weights for several static graphs of one component (a multi-size package: one transformer graph
per image size, the same parameters in each).

`share_weights` rewrites the ONNX graphs of one folder so that they keep their initializers in one external data
file beside them, each distinct tensor stored once (by content: the same bytes, dtype and shape), at offsets aligned
to 4 KiB so that ONNX Runtime can map them. Equal tensors also get the same initializer name in every graph, which
is what ONNX Runtime needs to share one copy between sessions (`SessionOptions.add_initializer`,
runtime/ort_backend.py). Tensors that differ between sizes (PixArt's sin-cos position table is folded into a
constant per grid) are stored once per content, like any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.bin"
INDEX_FILE = "weights.json"  # per graph, where each initializer lies in WEIGHTS_FILE (runtime/shared_weights.py)
# Tensors of at least ALIGN_THRESHOLD bytes start on a page (ONNX Runtime maps an external initializer whose offset
# is page-aligned instead of copying it, as onnx's own writer aligns them); smaller ones on 64 bytes.
ALIGN, ALIGN_THRESHOLD, SMALL_ALIGN = 4096, 1 << 20, 64
MIN_BYTES = 1024  # smaller tensors (scalars, shapes) stay inside the graph


def _location(tensor: onnx.TensorProto) -> str | None:
    return ExternalDataInfo(tensor).location if uses_external_data(tensor) else None


def _reads(model_paths: list[Path], weights_file: str) -> bool:
    """Whether any of the graphs already keeps initializers in `weights_file` (a size shared before)."""
    for path in model_paths:
        graph = onnx.load(str(path), load_external_data=False).graph
        if any(_location(t) == weights_file for t in graph.initializer):
            return True
    return False


def _tensor_bytes(tensor: onnx.TensorProto, folder: Path) -> bytes:
    """The raw little-endian bytes of an initializer, read from its external file when it has one. (A file being
    appended to is read safely: only tensors written before this call are ever read from it.)"""
    if uses_external_data(tensor):
        info = ExternalDataInfo(tensor)
        with open(folder / info.location, "rb") as f:
            f.seek(info.offset or 0)
            return f.read(info.length) if info.length else f.read()
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.to_array(tensor).tobytes()  # typed fields (float_data, ...)


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise RuntimeError(f"node {node.name} has a subgraph: weight sharing handles flat graphs only")
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)


def share_weights(model_paths: list[Path], targets: list[Path] | None = None, weights_file: str = WEIGHTS_FILE) -> dict:
    """Write the graphs `model_paths` to `targets` (default: in place; all in one folder) so that they read their
    initializers of at least MIN_BYTES from one file `weights_file` beside them, every distinct tensor once, and
    write its index INDEX_FILE (per graph file: initializer name -> offset, length, dtype, shape; the torch- and
    onnx-free runtime reads it to give several sessions one copy). Returns {"tensors", "bytes", "bytes_before"}.
    In place, the graphs' former external data files are removed."""
    targets = targets or model_paths
    folder = targets[0].parent
    if any(p.parent != folder for p in targets):
        raise ValueError("share_weights: the target graphs must be in one folder")
    stored: dict[tuple, tuple[str, int, int]] = {}  # content key -> (canonical name, offset, length)
    index: dict[str, dict] = {}
    old_files: set[str] = set()
    before = 0
    # Graphs that already read `weights_file` (sizes shared before): its tensors are kept where they are and the new
    # graphs' tensors appended, so that the disk holds the shared file plus one size's data, never every size's.
    current = folder / weights_file
    extend = all(p.parent == folder for p in model_paths) and _reads(model_paths, weights_file)
    tmp = current if extend else folder / f".{weights_file}.tmp"
    with open(tmp, "r+b" if extend else "wb") as out:
        out.seek(0, 2)
        for path, target in zip(model_paths, targets):
            model = onnx.load(str(path), load_external_data=False)
            graph = model.graph
            names = {t.name for t in graph.initializer}
            renames, tensors = {}, index.setdefault(target.name, {})
            for tensor in graph.initializer:
                if uses_external_data(tensor) and path.parent == folder:
                    old_files.add(ExternalDataInfo(tensor).location)
                data = _tensor_bytes(tensor, path.parent)
                if len(data) < MIN_BYTES:
                    continue
                before += len(data)
                key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(data).hexdigest())
                if key not in stored and extend and _location(tensor) == weights_file:
                    info = ExternalDataInfo(tensor)  # already in the shared file: it stays where it is
                    stored[key] = (tensor.name, info.offset or 0, info.length or len(data))
                if key not in stored:
                    align = ALIGN if len(data) >= ALIGN_THRESHOLD else SMALL_ALIGN
                    out.seek(-out.tell() % align, 1)  # pad to the next aligned offset
                    stored[key] = (tensor.name, out.tell(), len(data))
                    out.write(data)
                name, offset, length = stored[key]
                # The first graph's name for this content, unless this graph already uses it for another tensor.
                if name != tensor.name and name not in names:
                    renames[tensor.name] = name
                    tensor.name = name
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    tensor.ClearField(field)
                del tensor.external_data[:]
                for k, v in (("location", weights_file), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
                tensor.data_location = onnx.TensorProto.EXTERNAL
                dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).name
                tensors[tensor.name] = {"offset": offset, "length": length, "dtype": dtype, "shape": list(tensor.dims)}
            _rename_inputs(graph, renames)
            onnx.save_model(model, str(target))  # only the graph: the tensors point into weights_file
    if not extend:
        tmp.replace(current)
    (folder / INDEX_FILE).write_text(json.dumps({"file": weights_file, "graphs": index}, indent=1) + "\n")
    for name in old_files - {weights_file}:
        (folder / name).unlink(missing_ok=True)
    size = sum(length for _, _, length in stored.values())
    logger.info("%s: %d graphs share %d tensors, %.1f MB (%.1f MB before)", folder, len(model_paths), len(stored),
                size / 1e6, before / 1e6)  # fmt: skip
    return {"tensors": len(stored), "bytes": size, "bytes_before": before}
