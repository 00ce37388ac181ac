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

from ..runtime.scenes import training_scene
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


def shapes_pixart_pipeline(vae: AutoencoderKL, seed: int = 0) -> PixArtSigmaPipeline:
    """PixArt-Σ architecture: width 128 (4 heads x 32), 6 blocks, patch 2 on 32x32 latents; T5 width 64, 2 layers."""
    return pixart_pipeline(
        width=128, heads=4, head_dim=32, layers=6, sample_size=RESOLUTION // 2,
        t5_width=64, t5_layers=2, t5_heads=4, t5_ff=128, seed=seed, vae=vae,
    )  # fmt: skip


def shapes_sd3_pipeline(vae: AutoencoderKL, seed: int = 0):
    """SD3.5 architecture (one dual-attention block): width 128, 6 blocks, patch 2 on 32x32 latents; CLIP-L/G
    widths 32/64 and T5 width 64, 2 layers each."""
    return sd3_pipeline(
        heads=4, head_dim=32, layers=6, dual_layers=(0,), sample_size=RESOLUTION // 2, pos_embed_max_size=32,
        clip_widths=(32, 64), clip_layers=2, clip_heads=(4, 4), t5_width=64, t5_layers=2, t5_heads=4, t5_ff=128,
        seed=seed, vae=vae,
    )  # fmt: skip
