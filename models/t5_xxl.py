"""A true-size T5-v1.1-XXL encoder (the text encoder of PixArt-Σ and SD3.5: 24 blocks, d_model 4096, d_ff 10240,
64 heads; 4.76 B parameters, 19 GB in fp32) with random weights, written as a transformers folder one block at a time,
so that it never has to fit in memory: config.json, one safetensors shard per block (plus the embedding and the
final norm) and model.safetensors.index.json. `T5EncoderModel.from_pretrained` reads the folder like any other;
`edit-mobile export --max-component-mb` reads it chunk by chunk (export/t5_chunks.py).

Weights follow T5's own initialisation scheme (transformers' `T5PreTrainedModel._init_weights`, factor 1), so the
activations have a trained model's scale rather than PyTorch's default init's: normal with std d_model^-1/2 for
the feed-forward input and the attention keys / values / output, (d_model * d_kv)^-1/2 for the queries, d_ff^-1/2
for the feed-forward output, 1 for the embedding, ones for the RMSNorm weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

T5_XXL = {  # google/t5-v1_1-xxl's encoder, as PixArt-Σ and SD3.5 ship it
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.0,
    "is_encoder_decoder": False,
    "use_cache": False,
    "tie_word_embeddings": False,
}


def _std(name: str, c) -> float | None:
    """T5's init std for a weight by its name (None: a norm weight, ones)."""
    if name.endswith("layer_norm.weight"):
        return None
    if name.endswith("embed_tokens.weight"):
        return 1.0
    if name.endswith(".q.weight"):
        return (c.d_model * c.d_kv) ** -0.5
    if name.endswith((".k.weight", ".v.weight")):
        return c.d_model**-0.5
    if name.endswith(".o.weight"):
        return (c.num_heads * c.d_kv) ** -0.5
    if name.endswith(("wi.weight", "wi_0.weight", "wi_1.weight")):
        return c.d_model**-0.5
    if name.endswith("wo.weight"):
        return c.d_ff**-0.5
    if name.endswith("relative_attention_bias.weight"):
        return c.d_model**-0.5
    raise ValueError(f"no T5 init rule for {name}")


def write_random_t5(folder: str | Path, config: dict = T5_XXL, seed: int = 0) -> Path:
    """Write a random T5 encoder folder (config.json, safetensors shards, index), one block in memory at a time."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Block

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = T5Config(**config)
    c.architectures = ["T5EncoderModel"]
    parts = [("embed", None), *((f"block-{i:02d}", i) for i in range(c.num_layers)), ("final", None)]
    weight_map, total = {}, 0
    for k, (part, i) in enumerate(tqdm(parts, desc="T5 shards", unit="shard")):
        generator = torch.Generator().manual_seed(seed * 1000 + k)
        if i is not None:
            with torch.device("meta"):
                names = {f"encoder.block.{i}.{n}": p.shape for n, p in T5Block(c, i == 0).state_dict().items()}
        elif part == "embed":
            names = {"encoder.embed_tokens.weight": (c.vocab_size, c.d_model)}
        else:
            names = {"encoder.final_layer_norm.weight": (c.d_model,)}
        tensors = {}
        for name, shape in names.items():
            std = _std(name, c)
            tensors[name] = torch.ones(shape) if std is None else torch.randn(shape, generator=generator) * std
        shard = f"model-{part}.safetensors"
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    c.save_pretrained(folder)  # config.json last: the folder is complete
    logger.info("wrote %s: %.2f B parameters, %.1f GB", folder, total / 4e9, total / 1e9)
    return folder
