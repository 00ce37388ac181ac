"""The exported transformer: the diffusers `forward` written as a run of blocks, so that it can be one graph or a
chain of graphs split at block boundaries, each fitting a device's per-model memory (apple/ml-stable-diffusion's
`--chunk-unet`, for transformers).

Each chunk computes exactly what the diffusers `forward` computes for its blocks (checked equal to the whole model,
bit for bit, tests/test_transformer_chunks.py); the first chunk also embeds, the last also projects out and
unpatchifies (in tensors of rank <= 5, which mobile execution providers take). A single graph (`PixArtGraph`,
`SD3Graph`) is one chunk that is both first and last. The chain's inputs and outputs:

  PixArt-Σ / EDiT (PixArtTransformer2DModel.forward)
    first   sample, timestep, encoder_hidden_states, encoder_attention_mask
              -> hidden_K, block_timestep, embedded_timestep, context
    next    hidden_{k-1}, block_timestep, context, encoder_attention_mask -> hidden_k
    last    hidden_{k-1}, block_timestep, embedded_timestep, context, encoder_attention_mask -> out_sample
  SD3 / MM-EDiT (SD3Transformer2DModel.forward: the prompt stream changes in every block, so it passes too)
    first   sample, timestep, encoder_hidden_states, pooled_projections -> hidden_K, context_K, temb
    next    hidden_{k-1}, context_{k-1}, temb -> hidden_k, context_k
    last    hidden_{k-1}, context_{k-1}, temb -> out_sample

Every chunk holds only the modules it runs, so a traced chunk carries only its own weights. Inputs are positional
in the order of the chunk's `input_names` (the exporter's positional tracing); outputs in `output_names` order.
"""

from __future__ import annotations

import torch
from torch import nn


class _Zeros(nn.Module):
    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], *self.shape)


class SeparablePositions(nn.Module):
    """diffusers' `PatchEmbed` at one latent size, its 2-D sin-cos position embedding added as a row part and a
    column part.

    The embedding P of an (h, w) token grid is computed by diffusers (PixArt-Σ interpolates it to the size, SD3
    crops it from its table) and, in a static export, folded into one (h·w, D) constant per size: 18 MB at 1024²
    and 72 MB at 2048² for PixArt-Σ-XL, the only transformer weights that differ between the sizes of a multi-size
    package (8 % of an int8 package with four sizes). Each of its channels depends on the row or on the column
    only (half encode one axis, half the other), so P = R + C with R (h, 1, D) zero in the column channels and
    C (1, w, D) zero in the row channels: (h + w)·D numbers. `x + R + C` equals `x + P` exactly (in every channel
    one of the two terms is 0), and the export keeps the two small constants (the add of a graph value cannot be
    folded)."""

    def __init__(self, patch_embed, rows: torch.Tensor, columns: torch.Tensor):
        super().__init__()
        self.proj = patch_embed.proj
        self.register_buffer("rows", rows)  # (h, 1, D); persistent: ExecuTorch lowers only those
        self.register_buffer("columns", columns)  # (1, w, D)

    @staticmethod
    def wrap(patch_embed, sample_hw: tuple[int, int]) -> nn.Module:
        """The separable form of `patch_embed` at latent size `sample_hw`, or `patch_embed` itself when its
        embedding is not separable (checked exactly) or it normalises its tokens."""
        if getattr(patch_embed, "pos_embed", None) is None or getattr(patch_embed, "layer_norm", True):
            return patch_embed
        p = patch_embed.patch_size
        h, w = sample_hw[0] // p, sample_hw[1] // p
        # diffusers' own embedding at this size: its forward with a projection that returns zeros (0 + P = P)
        proj, dim = patch_embed.proj, patch_embed.proj.out_channels
        patch_embed.proj = _Zeros((dim, h, w))
        try:
            with torch.no_grad():
                pos = patch_embed(torch.zeros(1, proj.in_channels, *sample_hw))[0].reshape(h, w, dim)
        finally:
            patch_embed.proj = proj
        by_row = (pos == pos[:, :1]).all(dim=(0, 1))  # channels constant along each row: a function of the row
        rows = torch.where(by_row, pos[:, :1], 0.0)  # (h, 1, D)
        columns = torch.where(by_row, 0.0, pos[:1])  # (1, w, D)
        if not torch.equal(rows + columns, pos):
            return patch_embed
        return SeparablePositions(patch_embed, rows, columns)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:  # latent: (B, C, H, W)
        x = self.proj(latent).permute(0, 2, 3, 1)  # (B, h, w, D)
        x = x + self.rows + self.columns
        return x.reshape(x.shape[0], -1, x.shape[-1])  # (B, h*w, D)


def _grid_kwargs(transformer, sample_hw: tuple[int, int]) -> dict | None:
    """The attention kwargs the EDiT / MM-EDiT `forward` adds (the token grid its convolutions need); None for a
    softmax teacher, whose attention processors take no extra kwargs."""
    if "edit_config" not in transformer.config:
        return None
    p = transformer.config.patch_size
    return {"grid_size": (sample_hw[0] // p, sample_hw[1] // p)}


def _unpatchify(x: torch.Tensor, grid: tuple[int, int], patch: int, channels: int) -> torch.Tensor:
    """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p): the diffusers transformers' unpatchify, in tensors of rank <= 5.

    Diffusers reshapes to rank 6 and permutes with an einsum; Core ML's execution provider takes no tensor above
    rank 5 and no Einsum, NNAPI no Einsum, so that tail ran on the CPU (`inspect --android`). The same data
    movement as two transposes of rank 5 and 4 (exact: no arithmetic)."""
    (h, w), b = grid, x.shape[0]
    x = x.reshape(b * h, w, patch, patch, channels).permute(0, 2, 1, 3, 4)  # (B*h, p, w, p, C)
    return x.reshape(b, h * patch, w * patch, channels).permute(0, 3, 1, 2)  # (B, C, h*p, w*p)


class _Chunk(nn.Module):
    """Blocks `blocks` of `transformer`, with its embedding in front (`first`) and its output head behind (`last`);
    `sample_hw` is the latent size the chain is exported at (static)."""

    def __init__(self, transformer, blocks: range, first: bool, last: bool, sample_hw: tuple[int, int]):
        super().__init__()
        self.first, self.last = first, last
        # keyed by the block's index in the whole model, so that graph node names say which block they belong to
        self.transformer_blocks = nn.ModuleDict({str(i): transformer.transformer_blocks[i] for i in blocks})
        self.patch, self.channels = transformer.config.patch_size, transformer.out_channels
        self.grid = (sample_hw[0] // self.patch, sample_hw[1] // self.patch)
        self.width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        self.attention_kwargs = _grid_kwargs(transformer, sample_hw)

    def forward(self, *args):
        values = dict(zip(self.input_names, args, strict=True))
        values.update(self.run(values))
        return tuple(values[n] for n in self.output_names)


class PixArtChunk(_Chunk):
    def __init__(self, transformer, blocks: range, first: bool, last: bool, sample_hw: tuple[int, int]):
        super().__init__(transformer, blocks, first, last, sample_hw)
        if first:
            self.pos_embed = SeparablePositions.wrap(transformer.pos_embed, sample_hw)
            self.adaln_single = transformer.adaln_single
            self.caption_projection = transformer.caption_projection
        if last:
            self.norm_out, self.proj_out = transformer.norm_out, transformer.proj_out
            self.scale_shift_table = transformer.scale_shift_table
        k = blocks[-1]
        if first:
            self.input_names = ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
        else:
            self.input_names = [f"hidden_{blocks[0] - 1}", "block_timestep", "context", "encoder_attention_mask"]
            self.input_names[2:2] = ["embedded_timestep"] if last else []
        if last:
            self.output_names = ["out_sample"]
        else:
            self.output_names = [f"hidden_{k}"] + (["block_timestep", "embedded_timestep", "context"] if first else [])

    def value_shape(self, name: str, batch: int, text_tokens: int) -> tuple[int, ...]:
        """The static shape of a value passed between chunks."""
        tokens, d = self.grid[0] * self.grid[1], self.width
        shapes = {"block_timestep": (batch, 6 * d), "embedded_timestep": (batch, d), "context": (batch, text_tokens, d)}
        return shapes.get(name, (batch, tokens, d))  # hidden_k

    def run(self, v: dict) -> dict:
        mask = v["encoder_attention_mask"]  # (B, T) 1 = token, 0 = padding -> an additive bias (B, 1, T)
        bias = ((1 - mask.to(torch.float32)) * -10000.0).unsqueeze(1)
        out = {}
        if self.first:
            sample = v["sample"]  # (B, C, H, W)
            hidden = self.pos_embed(sample)  # (B, N, D)
            block_t, embedded_t = self.adaln_single(
                v["timestep"], {"resolution": None, "aspect_ratio": None}, batch_size=sample.shape[0],
                hidden_dtype=hidden.dtype,
            )  # fmt: skip  # (B, 6D), (B, D)
            context = v["encoder_hidden_states"]
            if self.caption_projection is not None:
                context = self.caption_projection(context).view(sample.shape[0], -1, hidden.shape[-1])  # (B, T, D)
            out = {"block_timestep": block_t, "embedded_timestep": embedded_t, "context": context}
        else:
            hidden = v[self.input_names[0]]
            block_t, context = v["block_timestep"], v["context"]
        for block in self.transformer_blocks.values():
            hidden = block(
                hidden, attention_mask=None, encoder_hidden_states=context, encoder_attention_mask=bias,
                timestep=block_t, cross_attention_kwargs=self.attention_kwargs, class_labels=None,
            )  # fmt: skip
        if not self.last:
            return {**out, self.output_names[0]: hidden}
        embedded_t = v.get("embedded_timestep", out.get("embedded_timestep"))
        shift, scale = (self.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
        hidden = self.proj_out(self.norm_out(hidden) * (1 + scale) + shift)  # (B, N, p*p*C)
        return {"out_sample": _unpatchify(hidden, self.grid, self.patch, self.channels)}


class SD3Chunk(_Chunk):
    def __init__(self, transformer, blocks: range, first: bool, last: bool, sample_hw: tuple[int, int]):
        super().__init__(transformer, blocks, first, last, sample_hw)
        if first:
            self.pos_embed = SeparablePositions.wrap(transformer.pos_embed, sample_hw)
            self.time_text_embed = transformer.time_text_embed
            self.context_embedder = transformer.context_embedder
        if last:
            self.norm_out, self.proj_out = transformer.norm_out, transformer.proj_out
        k = blocks[-1]
        if first:
            self.input_names = ["sample", "timestep", "encoder_hidden_states", "pooled_projections"]
        else:
            self.input_names = [f"hidden_{blocks[0] - 1}", f"context_{blocks[0] - 1}", "temb"]
        if last:
            self.output_names = ["out_sample"]
        else:
            self.output_names = [f"hidden_{k}", f"context_{k}"] + (["temb"] if first else [])

    def value_shape(self, name: str, batch: int, text_tokens: int) -> tuple[int, ...]:
        """The static shape of a value passed between chunks."""
        if name == "temb":
            return (batch, self.width)
        return (batch, text_tokens if name.startswith("context") else self.grid[0] * self.grid[1], self.width)

    def run(self, v: dict) -> dict:
        out = {}
        if self.first:
            hidden = self.pos_embed(v["sample"]).contiguous()  # (B, N, D)
            temb = self.time_text_embed(v["timestep"], v["pooled_projections"])  # (B, D)
            context = self.context_embedder(v["encoder_hidden_states"])  # (B, T, D)
            out = {"temb": temb}
        else:
            hidden, context, temb = (v[n] for n in self.input_names)
        for block in self.transformer_blocks.values():
            context, hidden = block(
                hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                joint_attention_kwargs=self.attention_kwargs,
            )  # fmt: skip
        if not self.last:
            return {**out, self.output_names[0]: hidden, self.output_names[1]: context}
        hidden = self.proj_out(self.norm_out(hidden, temb))  # (B, N, p*p*C)
        return {"out_sample": _unpatchify(hidden, self.grid, self.patch, self.channels)}


class PixArtGraph(PixArtChunk):
    """The whole transformer as one graph (a chunk that is first and last), with named inputs: Core ML's
    torch.export route names a program's inputs after the forward's parameters."""

    def __init__(self, transformer, sample_hw: tuple[int, int]):
        super().__init__(transformer, range(len(transformer.transformer_blocks)), True, True, sample_hw)

    def forward(self, sample, timestep, encoder_hidden_states, encoder_attention_mask):
        return super().forward(sample, timestep, encoder_hidden_states, encoder_attention_mask)[0]


class SD3Graph(SD3Chunk):
    """The whole transformer as one graph, with named inputs (see PixArtGraph)."""

    def __init__(self, transformer, sample_hw: tuple[int, int]):
        super().__init__(transformer, range(len(transformer.transformer_blocks)), True, True, sample_hw)

    def forward(self, sample, timestep, encoder_hidden_states, pooled_projections):
        return super().forward(sample, timestep, encoder_hidden_states, pooled_projections)[0]


def block_bytes(transformer) -> list[int]:
    """fp32 bytes of each block's weights."""
    return [4 * sum(p.numel() for p in b.parameters()) for b in transformer.transformer_blocks]


def plan_blocks(transformer, chunks: int | None = None, max_chunk_mb: float | None = None) -> list[range]:
    """Consecutive block ranges: `chunks` of them with as even block counts as possible, or as few as keep every
    chunk within `max_chunk_mb` of fp32 weights (the embedding and the head count toward the first and last)."""
    sizes = block_bytes(transformer)
    if chunks is not None:  # even block counts: blocks of one model are (nearly) the same size
        if not 2 <= chunks <= len(sizes):
            raise ValueError(f"chunks must be in 2..{len(sizes)} (the transformer has {len(sizes)} blocks)")
        edges = [round(k * len(sizes) / chunks) for k in range(chunks + 1)]
        return [range(a, b) for a, b in zip(edges, edges[1:])]
    budget = max_chunk_mb * 2**20
    rest = 4 * sum(p.numel() for p in transformer.parameters()) - sum(sizes)  # embeddings and head
    plan, start, used = [], 0, rest
    for i, size in enumerate(sizes):
        if i > start and used + size > budget:
            plan.append(range(start, i))
            start, used = i, 0
        used += size
    plan.append(range(start, len(sizes)))
    return plan
