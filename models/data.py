"""Training data for distillation: an image + caption folder or a synthetic source, and the cached encoder.

Folder layout (docs/distillation.md): images and their captions side by side in one flat folder,

    DATA/
      0001.png   an image: .png .jpg .jpeg .webp, any size and aspect ratio
      0001.txt   its caption: UTF-8 text with the same stem (an empty file is an empty prompt)
      cat.jpg
      cat.txt

Every image needs a caption (the loader names the ones that lack it); subfolders are not searched. Images are
resized so that the shorter side is the stage resolution and centre-cropped to a square.

The synthetic source draws, deterministically from its index, one or two coloured shapes on a coloured background
with a caption that says what is drawn ("a large red circle and a small blue square on a white background"; see
runtime/scenes.py): the shapes models' training data, no files needed. `--data synthetic` has 1024 items,
`synthetic:N` N; `synthetic-single[:N]` draws one shape per scene.

`PipelineEncoder` turns captions into the pipeline's own text encodings and images into VAE latents. Both are
cached in memory (up to a byte budget) and computed one item at a time, so an item's encoding does not depend
on which other items happen to share its batch: a resumed run sees bit-identical inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..runtime.errors import UserError
from ..runtime.scenes import training_scene
from .families import torch_family

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class FolderSource:
    """Images with same-stem .txt captions in one flat folder (see the module docstring)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise UserError(f"data folder {folder} does not exist (pass a folder of images + captions, or 'synthetic')")
        self.images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.images:
            raise UserError(f"data folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        missing = [p.name for p in self.images if not p.with_suffix(".txt").is_file()]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise UserError(f"data folder {folder}: {len(missing)} image(s) without a same-stem .txt caption: {shown}")
        self.captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, index: int) -> str:
        return self.captions[index]

    def image(self, index: int, resolution: int) -> Image.Image:
        try:
            with Image.open(self.images[index]) as im:
                return center_crop_resize(im.convert("RGB"), resolution)
        except OSError as e:
            raise UserError(f"cannot read image {self.images[index]}: {e}") from None


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Shorter side -> size (bicubic), then the central size x size square."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


class SyntheticSource:
    """Procedural scenes (runtime/scenes.py) with matching captions; item i is the same image and caption on every
    call and rank. No held-out attribute combination ever appears (those are the evaluation prompts)."""

    def __init__(self, size: int = 1024, seed: int = 0, max_shapes: int = 2):
        if size < 1:
            raise UserError(f"synthetic data size must be >= 1, got {size}")
        self.size, self.seed, self.max_shapes = size, seed, max_shapes

    def __len__(self) -> int:
        return self.size

    def caption(self, index: int) -> str:
        return training_scene(self.seed, index, self.max_shapes).caption

    def image(self, index: int, resolution: int) -> Image.Image:
        return training_scene(self.seed, index, self.max_shapes).render(resolution)


SYNTHETIC = {"synthetic": 2, "synthetic-single": 1}  # source name -> most shapes per scene


def open_source(spec: str | Path, seed: int = 0):
    """'synthetic[:N]' (one or two shapes) / 'synthetic-single[:N]' (one shape) -> SyntheticSource of N items
    (default 1024); anything else is a data folder."""
    name, _, size = str(spec).partition(":")
    if name in SYNTHETIC:
        if size and not size.isdigit():
            raise UserError(f"bad data source {spec!r}: expected a folder, '{name}' or '{name}:N'")
        return SyntheticSource(int(size or 1024), seed, SYNTHETIC[name])
    return FolderSource(spec)


def image_to_tensor(image: Image.Image):
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [-1, 1]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)


@dataclass
class TextBatch:
    """Transformer conditioning for one batch; `kwargs()` gives the keyword arguments of the transformer call."""

    encoder_hidden_states: object  # (B, T, D)
    encoder_attention_mask: object | None = None  # PixArt: (B, T) 1 = token, 0 = padding
    pooled_projections: object | None = None  # SD3: (B, P)

    def kwargs(self) -> dict:
        out = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.encoder_attention_mask is not None:
            out["encoder_attention_mask"] = self.encoder_attention_mask
        if self.pooled_projections is not None:
            out["pooled_projections"] = self.pooled_projections
        return out


class PipelineEncoder:
    """Captions -> the pipeline's text encodings, images -> VAE latents; both cached (one item at a time).

    PixArt-Σ: T5 hidden states with the attention mask; only the unpadded tokens are cached and a batch is padded
    to its longest caption (the mask makes this equal to the pipeline's fixed-length padding).
    SD3: the pipeline's joint CLIP-L/G + T5 prompt embeddings and pooled projections (no mask in SD3).
    Latents: the VAE posterior mean, scaled (and shifted for SD3) as the pipeline expects.
    """

    def __init__(
        self, pipe, family: str, device, dtype, max_text_tokens: int | None = None, cache_bytes: int = 4 << 30
    ):
        self.pipe, self.family, self.device, self.dtype = pipe, family, device, dtype
        self.rules = torch_family(family)  # how this family encodes and batches captions
        self.max_text_tokens = max_text_tokens or self.rules.spec.default_text_tokens
        self.cache_bytes, self.cached_bytes = cache_bytes, 0
        self._text: dict[str, tuple] = {}
        self._latents: dict[tuple, object] = {}

    def _remember(self, cache: dict, key, value):
        size = sum(t.numel() * t.element_size() for t in (value if isinstance(value, tuple) else (value,)))
        if self.cached_bytes + size <= self.cache_bytes:
            cache[key] = value
            self.cached_bytes += size
        return value

    def _encode_caption(self, caption: str):
        import torch

        with torch.no_grad():
            return self.rules.encode_caption(self.pipe, caption, self.device, self.dtype, self.max_text_tokens)

    def text(self, captions: list[str]) -> TextBatch:
        items = [self._text.get(c) or self._remember(self._text, c, self._encode_caption(c)) for c in captions]
        return TextBatch(**self.rules.collate_text(items, self.dtype, self.device))

    def _encode_image(self, source, index: int, resolution: int):
        import torch

        vae = self.pipe.vae
        pixels = image_to_tensor(source.image(index, resolution))[None].to(self.device, vae.dtype)
        with torch.no_grad():
            latent = vae.encode(pixels).latent_dist.mean[0]  # (C, R/8, R/8)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latent - shift) * vae.config.scaling_factor).float()

    def latents(self, source, indices: list[int], resolution: int):
        import torch

        out = []
        for i in indices:
            key = (i, resolution)
            out.append(
                self._latents.get(key)
                if key in self._latents
                else self._remember(self._latents, key, self._encode_image(source, i, resolution))
            )
        return torch.stack(out)  # (B, C, R/8, R/8), fp32
