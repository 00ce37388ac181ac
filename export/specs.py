"""The export specs of a component: its static input / output tensors and the torch module (or, for a chunked
component, the builders of its chunks; for a tiled one, the module at the tile's size) that the exporters trace."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..runtime.tiling import Tiling


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name: "float32", "int64"

    def example(self, generator: torch.Generator) -> torch.Tensor:
        if "attention_mask" in self.name:  # binary, as a tokenizer makes it: each row a prefix of ones (>= 1 token)
            *rows, length = self.shape
            kept = torch.randint(1, length + 1, (*rows, 1), generator=generator)
            return (torch.arange(length) < kept).to(torch.int64 if self.dtype == "int64" else torch.float32)
        if self.dtype == "int64":
            return torch.randint(0, 100, self.shape, generator=generator)
        return torch.randn(self.shape, generator=generator)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class ComponentSpec:
    name: str  # folder name in the package: text_encoder, transformer, vae_decoder, ...
    module: nn.Module | None  # takes the inputs positionally, returns a tensor or a tuple of tensors
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    extra: dict = field(default_factory=dict)  # e.g. tokenizer folder and max length for text encoders
    # A component exported as a chain of graphs (module None): one builder per chunk, each materialising its own
    # weights only when called (export/t5_chunks.py)
    chunks: list[Callable[[], ComponentSpec]] = field(default_factory=list)
    # A tiled component (`export --vae-tile`): `inputs` / `outputs` are full size, the graph takes one tile
    tiling: Tiling | None = None

    def graph(self) -> ComponentSpec:
        """What the exporters trace: this spec, or for a tiled component the same module at the tile's size."""
        if self.tiling is None:
            return self
        (full_in,), (full_out,), tile = self.inputs, self.outputs, self.tiling.tile
        scale = full_out.shape[-1] / full_in.shape[-1]  # 8 for a decoder, 1/8 for an encoder
        out_tile = tuple(round(n * scale) for n in tile)
        return ComponentSpec(
            self.name,
            self.module,
            [TensorSpec(full_in.name, (*full_in.shape[:-2], *tile), full_in.dtype)],
            [TensorSpec(full_out.name, (*full_out.shape[:-2], *out_tile), full_out.dtype)],
            self.extra,
        )

    def io_dict(self) -> dict:
        return {"inputs": [s.to_dict() for s in self.inputs], "outputs": [s.to_dict() for s in self.outputs]}
