"""The shapes models: small PixArt-Σ and SD3 pipelines trained from scratch on procedural scenes (runtime/scenes.py).

Their images mean something, so export, quantization and validation can be judged by prompt accuracy, not only by
PSNR against a random network. Everything is built from configs with fixed seeds and trained by
`scripts/train_shapes.py`; this module holds the architectures and the VAE's training loop (the transformers are
trained by the distillation trainer's from-scratch mode, models/distill.py).

Sizes (native resolution 64 px): a VAE with 2x downsampling (32x32 latents), patch 2, i.e. 256 image tokens per
transformer, the smallest count at which ConvFusion and the Spatial Compressor have real work to do. (A 4x VAE of the
same cost reconstructed at 23.6 dB, and the attribute classifier read only 82 % of its round trips right: the VAE
would have capped the prompt accuracy below the target.)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, PixArtSigmaPipeline

from ..runtime.scenes import COLORS, SHAPES, SIZES, Scene, evaluation_scenes, training_scene
from .data import image_to_tensor
from .presets import pixart_pipeline, sd3_pipeline

logger = logging.getLogger(__name__)

RESOLUTION = 64  # native image size in pixels
VAE_BLOCKS = (32, 64)  # two blocks: 2x downsampling (64 px -> 32x32 latents)


@dataclass
class VAETrainConfig:
    """The VAE's training run; saved beside the trained VAE as vae_train.json."""

    latent_channels: int = 4  # 4: SDXL layout (PixArt-Σ); 16: SD3 layout
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    kl_weight: float = 1e-6
    resolution: int = RESOLUTION
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def shapes_vae(latent_channels: int) -> AutoencoderKL:
    sd3 = latent_channels == 16
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=VAE_BLOCKS,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_BLOCKS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_BLOCKS),
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,  # flat shapes need no global attention; it would cost most of the time
        sample_size=RESOLUTION,
        scaling_factor=1.0,  # set from the trained latents' statistics (train_vae)
        shift_factor=0.0 if sd3 else None,
        use_quant_conv=not sd3,
        use_post_quant_conv=not sd3,
    )


def _scene_batch(seed: int, start: int, count: int, resolution: int) -> torch.Tensor:
    return torch.stack(
        [image_to_tensor(training_scene(seed, i).render(resolution)) for i in range(start, start + count)]
    )


def train_vae(config: VAETrainConfig) -> tuple[AutoencoderKL, list[float]]:
    """Reconstruction (MSE) + a small KL term on procedural scenes; then the latent scaling (and, SD3 layout, shift)
    factors are set so that scaled latents have unit variance, as SD / SD3 did for theirs."""
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    vae = shapes_vae(config.latent_channels).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.05)
    losses = []
    for step in tqdm(range(config.steps), desc="vae", unit="step"):
        x = _scene_batch(config.seed + 1, step * config.batch_size, config.batch_size, config.resolution)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0:
            logger.info("vae step %d loss %.5f", step, losses[-1])
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(_scene_batch(config.seed + 2, 0, 256, config.resolution)).latent_dist.mean
    if config.latent_channels == 16:
        vae.register_to_config(shift_factor=round(float(latents.mean()), 4))
        latents = latents - vae.config.shift_factor
    vae.register_to_config(scaling_factor=round(float(1 / latents.std()), 4))
    return vae, losses


@dataclass
class TextTrainConfig:
    """The text encoder's pretraining run; saved beside the trained encoder as text_train.json."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    max_tokens: int = 32  # the transformers' --max-text-tokens
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


# What each caption word describes: PixArt's cross-attention sees the prompt's token embeddings as a set (no
# positions), so a colour token is useful only if its embedding says whose colour it is.
ROLES = ("first shape", "second shape", "background", "connective")
WORDS = ("a", "and", "on", "background", *SIZES, *COLORS, *SHAPES)


def _word_roles(scene: Scene) -> list[int]:
    """Per caption word: "a large red circle and a small blue square on a white background" ->
    0 0 0 0 3 1 1 1 1 3 3 2 2."""
    roles = []
    for k in range(len(scene.shapes)):
        roles += [3] * (k > 0) + [k] * 4  # ("and") "a SIZE COLOUR SHAPE"
    return roles + [3, 3, 2, 2]  # "on a COLOUR background"


def _token_targets(tokenizer, scenes: list[Scene], max_tokens: int):
    """Token ids, attention mask, and per token its word's index in WORDS and its role (-100: special token)."""
    batch = tokenizer(
        [s.caption.split() for s in scenes], is_split_into_words=True, max_length=max_tokens,
        padding="max_length", truncation=True, return_tensors="pt",
    )  # fmt: skip
    words = torch.full(batch.input_ids.shape, -100)
    roles = torch.full(batch.input_ids.shape, -100)
    for b, scene in enumerate(scenes):
        caption, scene_roles = scene.caption.split(), _word_roles(scene)
        for t, w in enumerate(batch.word_ids(b)):
            if w is not None:
                words[b, t], roles[b, t] = WORDS.index(caption[w]), scene_roles[w]
    return batch.input_ids, batch.attention_mask, words, roles


def train_text_encoder(encoder, tokenizer, config: TextTrainConfig) -> dict:
    """Pretrain a tiny text encoder in place so that each token's output says which word it belongs to and what
    that word describes (first shape, second shape, background); returns the held-out accuracies.

    Why: real PixArt-Σ / SD3 text encoders are pretrained and give contextual embeddings; a random one does not. In
    the random tiny T5, the output at "red" is nearly the same whether red is the shape's or the background's
    colour (cosine 0.94 across roles vs 0.05 across colours; a linear probe tells the role 62 % of the time), and a
    teacher trained on it drew the caption's two colours swapped. Trained here on training captions only (one or two
    shapes), then frozen like a real pipeline's encoder."""
    torch.manual_seed(config.seed)
    heads = torch.nn.Linear(encoder.config.hidden_size, len(WORDS) + len(ROLES))
    params = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.1)

    def logits(scenes):
        ids, mask, words, roles = _token_targets(tokenizer, scenes, config.max_tokens)
        out = heads(encoder(ids, attention_mask=mask).last_hidden_state)
        return out[..., : len(WORDS)], out[..., len(WORDS) :], words, roles

    encoder.train()
    for step in range(config.steps):
        start = step * config.batch_size
        scenes = [training_scene(config.seed + 3, i) for i in range(start, start + config.batch_size)]
        word_logits, role_logits, words, roles = logits(scenes)
        loss = F.cross_entropy(word_logits.flatten(0, 1), words.flatten()) + F.cross_entropy(
            role_logits.flatten(0, 1), roles.flatten()
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            logger.info("text encoder step %d loss %.4f", step, loss.item())
    encoder.eval().requires_grad_(False)
    with torch.no_grad():  # held-out single-shape prompts: the captions the teachers are evaluated on
        word_logits, role_logits, words, roles = logits(evaluation_scenes(88, seed=config.seed))
    known = words != -100
    return {
        "word_accuracy": float((word_logits.argmax(-1) == words)[known].float().mean()),
        "role_accuracy": float((role_logits.argmax(-1) == roles)[known].float().mean()),
    }


def shapes_pixart_pipeline(vae: AutoencoderKL, seed: int = 0) -> PixArtSigmaPipeline:
    """PixArt-Σ architecture: width 128 (4 heads x 32), 6 blocks, patch 2 on 32x32 latents; T5 width 64, 2 layers."""
    return pixart_pipeline(
        width=128, heads=4, head_dim=32, layers=6, sample_size=RESOLUTION // 2,
        t5_width=64, t5_layers=2, t5_heads=4, t5_ff=128, seed=seed, vae=vae,
    )  # fmt: skip


def shapes_sd3_pipeline(vae: AutoencoderKL, seed: int = 0):
    """SD3.5 architecture (one dual-attention block): width 96 (3 heads of 32), 6 blocks, patch 2 on 32x32 latents
    (2.04 M parameters: an MM-DiT block carries a prompt stream too, so width 96 keeps it near PixArt's size, and the
    four shipped transformers within the 20 MB the repository allows); CLIP-L/G widths 32/64 and T5 width 64, 2
    layers each."""
    return sd3_pipeline(
        heads=3, head_dim=32, layers=6, dual_layers=(0,), sample_size=RESOLUTION // 2, pos_embed_max_size=32,
        clip_widths=(32, 64), clip_layers=2, clip_heads=(4, 4), t5_width=64, t5_layers=2, t5_heads=4, t5_ff=128,
        seed=seed, vae=vae,
    )  # fmt: skip
