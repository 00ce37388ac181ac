"""Where an ONNX graph's weights live on disk: in the protobuf, or in one external data file beside it.

No torch here: the exporter and the quantizer (which must not load torch) both save graphs this way.
"""

from __future__ import annotations

from pathlib import Path

import onnx

# ONNX protobufs are limited to 2 GB: larger models keep their weights in one external data file.
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2


def external_data_file(path: Path) -> str:
    """The external data file of graph `path`: model.onnx -> model.onnx.data."""
    return Path(path).name + ".data"


def save_onnx(model: onnx.ModelProto, path: Path, large: bool) -> None:
    """Save `model` to `path`; `large`: every weight over 1 KB in `external_data_file(path)`."""
    if large:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=external_data_file(path),
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(path))
