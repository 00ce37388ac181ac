"""A T5 encoder as a chain of graphs, built and exported one chunk at a time, so that a true-size T5-XXL
(4.7 B parameters, 19 GB in fp32) never has to be in memory at once.

The chain computes exactly what transformers' `T5Stack.forward` computes (checked equal, tests/test_t5_chunks.py):

    chunk 0      input_ids [, attention_mask]               -> hidden_0, position_bias
                 (the token embedding, the first blocks; block 0 computes the relative position bias)
    chunk k      hidden_{k-1}, position_bias [, attention_mask] -> hidden_k        (the next blocks)
    last chunk   ... -> last_hidden_state                                          (+ the final RMSNorm)

Every chunk rebuilds the attention mask from `attention_mask` (cheap), so only the hidden states and the shared
position bias pass between chunks. The weights come from a `T5Parts` source: the modules of an in-memory encoder
(`ModuleParts`), or a diffusers / transformers folder's safetensors read tensor by tensor (`FolderParts`: only the
chunk being exported is materialised).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..runtime.errors import UserError
from .specs import ComponentSpec, TensorSpec


class ModuleParts:
    """The parts of an in-memory `T5EncoderModel`."""

    def __init__(self, encoder):
        self.config = encoder.config
        self.stack = encoder.encoder

    def embed(self) -> nn.Embedding:
        return self.stack.embed_tokens

    def block(self, i: int) -> nn.Module:
        return self.stack.block[i]

    def final_norm(self) -> nn.Module:
        return self.stack.final_layer_norm


class FolderParts:
    """The parts of a saved `T5EncoderModel` (a folder with config.json and model.safetensors, or shards with
    model.safetensors.index.json), each built on the meta device and filled from the files on demand."""

    def __init__(self, folder: str | Path):
        from transformers import T5Config

        self.folder = Path(folder)
        self.config = T5Config.from_pretrained(self.folder)
        # the attention a from_pretrained model gets by default (a bare config leaves it unset)
        self.config._attn_implementation = "sdpa"
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(self.folder / "model.safetensors", "pt") as f:
                self.files = dict.fromkeys(f.keys(), self.folder / "model.safetensors")
        else:
            raise UserError(f"{self.folder}: no model.safetensors (or index) to read the T5 weights from")

    def _load(self, module: nn.Module, prefix: str) -> nn.Module:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in module.state_dict():
            if prefix + name not in self.files:
                raise UserError(f"{self.folder}: the T5 weights have no tensor {prefix + name}")
            by_file.setdefault(self.files[prefix + name], []).append(name)
        state = {}
        for file, names in by_file.items():  # each shard opened once
            with safe_open(file, "pt") as f:
                state.update({name: f.get_tensor(prefix + name).float() for name in names})
        module.load_state_dict(state, assign=True)
        return module.eval()

    def embed(self) -> nn.Embedding:
        with torch.device("meta"):
            module = nn.Embedding(self.config.vocab_size, self.config.d_model)
        prefix = "encoder.embed_tokens." if "encoder.embed_tokens.weight" in self.files else "shared."
        return self._load(module, prefix)

    def block(self, i: int) -> nn.Module:
        from transformers.models.t5.modeling_t5 import T5Block

        with torch.device("meta"):
            module = T5Block(self.config, has_relative_attention_bias=i == 0, layer_idx=i)
        return self._load(module, f"encoder.block.{i}.")

    def final_norm(self) -> nn.Module:
        from transformers.models.t5.modeling_t5 import T5LayerNorm

        with torch.device("meta"):
            module = T5LayerNorm(self.config.d_model, eps=self.config.layer_norm_epsilon)
        return self._load(module, "encoder.final_layer_norm.")


class T5Chunk(nn.Module):
    """Blocks `blocks` of a T5 encoder (with the embedding in front when `embed` is given, and the final norm
    behind when `final_norm` is), as `T5Stack.forward` runs them."""

    def __init__(self, config, blocks: list[nn.Module], embed=None, final_norm=None, with_mask: bool = True):
        super().__init__()
        self.config, self.with_mask = config, with_mask
        self.embed, self.blocks, self.final_norm = embed, nn.ModuleList(blocks), final_norm

    def forward(self, *args):
        from transformers.masking_utils import create_bidirectional_mask

        if self.embed is not None:  # input_ids [, attention_mask]
            hidden, position_bias = self.embed(args[0]), None
        else:  # hidden, position_bias [, attention_mask]
            hidden, position_bias = args[0], args[1]
        attention_mask = args[-1] if self.with_mask else None
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
        for block in self.blocks:
            hidden, position_bias, _ = block(hidden, mask, position_bias)
        if self.final_norm is not None:
            return self.final_norm(hidden)
        return (hidden, position_bias) if self.embed is not None else hidden


def block_bytes(config) -> int:
    """fp32 bytes of one T5 block's weights (attention q, k, v, o and the feed-forward), from the config."""
    inner = config.num_heads * config.d_kv
    ff = (3 if config.is_gated_act else 2) * config.d_model * config.d_ff
    return 4 * (4 * config.d_model * inner + ff + 2 * config.d_model)


def t5_bytes(config) -> int:
    """fp32 bytes of a T5 encoder's weights: the embedding and every block."""
    return 4 * config.vocab_size * config.d_model + config.num_layers * block_bytes(config)


def streamed_t5_parts(src: str, max_component_mb: float | None) -> dict[str, FolderParts]:
    """For a pipeline folder: {component: FolderParts} for each T5 encoder whose fp32 weights exceed
    `max_component_mb`, to be exported from its files chunk by chunk instead of being loaded whole."""
    folder = Path(src)
    if max_component_mb is None or not (folder / "model_index.json").is_file():
        return {}
    out = {}
    for name in json.loads((folder / "model_index.json").read_text()):
        config = folder / name / "config.json"
        if not name.startswith("_") and config.is_file() and json.loads(config.read_text()).get("model_type") == "t5":
            parts = FolderParts(folder / name)
            if t5_bytes(parts.config) > max_component_mb * 2**20:
                out[name] = parts
    return out


def plan_chunks(config, max_chunk_mb: float) -> list[range]:
    """Consecutive block ranges, each within `max_chunk_mb` of fp32 weights (the first also holds the embedding;
    at least one block per chunk)."""
    budget, per_block = max_chunk_mb * 2**20, block_bytes(config)
    first = 4 * config.vocab_size * config.d_model
    chunks, start, used = [], 0, first
    for i in range(config.num_layers):
        if i > start and used + per_block > budget:
            chunks.append(range(start, i))
            start, used = i, 0
        used += per_block
    chunks.append(range(start, config.num_layers))
    return chunks


def t5_chunk_specs(
    parts, name: str, length: int, with_mask: bool, max_chunk_mb: float
) -> list[Callable[[], ComponentSpec]]:
    """One builder per chunk: each, called, materialises that chunk's weights and returns its ComponentSpec
    (`name`.chunk-NN, positional inputs in the order above)."""
    config, d = parts.config, parts.config.d_model
    heads = config.num_heads
    plan = plan_chunks(config, max_chunk_mb)
    mask = [TensorSpec("attention_mask", (1, length), "int64")] if with_mask else []
    bias = TensorSpec("position_bias", (1, heads, length, length), "float32")

    def hidden(k: int) -> TensorSpec:
        return TensorSpec(f"hidden_{k}", (1, length, d), "float32")

    def builder(k: int, blocks: range) -> Callable[[], ComponentSpec]:
        def build() -> ComponentSpec:
            last = k == len(plan) - 1
            module = T5Chunk(
                config,
                [parts.block(i) for i in blocks],
                embed=parts.embed() if k == 0 else None,
                final_norm=parts.final_norm() if last else None,
                with_mask=with_mask,
            ).eval()
            inputs = [TensorSpec("input_ids", (1, length), "int64")] if k == 0 else [hidden(k - 1), bias]
            outputs = [TensorSpec("last_hidden_state", (1, length, d), "float32")] if last else [hidden(k)]
            if k == 0 and not last:
                outputs.append(bias)
            return ComponentSpec(f"{name}.chunk-{k:02d}", module, inputs + mask, outputs, {"blocks": list(blocks)})

        return build

    return [builder(k, blocks) for k, blocks in enumerate(plan)]
