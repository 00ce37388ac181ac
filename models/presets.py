"""Model presets: complete tiny pipelines for tests, and the published transformer architectures at true size.

Pretrained weights cannot be downloaded here, so every preset is built from configs with fixed seeds, with the
real diffusers / transformers classes (the stock pipeline classes load them). Tokenizers are the real
`T5Tokenizer` / `CLIPTokenizer` classes with small vocabularies trained with `tokenizers` on the bundled prompt
list and shipped in models/assets (`scripts/train_tiny_tokenizers.py` remakes them; the BPE trainer breaks ties
in a random order, so training at build time would not give the same tokenizer twice). A user with real weights
points any command at a local diffusers folder instead.

True-size presets (`pixart-sigma-xl`, `sd35-medium`) have the published transformer and VAE architectures; their
text encoders keep the true width (so the transformer sees true-size prompt embeddings) but only one or two
layers, because a random-initialised T5-XXL (4.7 B parameters) would not fit this machine's memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)


def bundled_prompts() -> list[str]:
    """The shipped prompt list: tokenizer training corpus, default calibration and validation prompts."""
    text = resources.files("edit_mobile.models").joinpath("assets/prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _asset_json(name: str) -> dict:
    return json.loads(resources.files("edit_mobile.models").joinpath(f"assets/{name}").read_text(encoding="utf-8"))


def build_t5_tokenizer() -> T5Tokenizer:
    """A real T5Tokenizer (Unigram, `</s>` appended) with the shipped 325-piece vocabulary."""
    vocab = [tuple(p) for p in _asset_json("tiny_t5_unigram.json")["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A real CLIPTokenizer (byte-level BPE, `</w>` suffix) with the shipped 800-token vocabulary."""
    bpe = _asset_json("tiny_clip_bpe.json")
    merges = [tuple(m.split(" ")) for m in bpe["merges"]]
    return CLIPTokenizer(vocab=bpe["vocab"], merges=merges, model_max_length=max_length)


def _t5_encoder(vocab_size: int, d_model: int, layers: int, heads: int, d_ff: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=d_model // heads,
            d_ff=d_ff,
            num_layers=layers,
            num_heads=heads,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            is_encoder_decoder=False,
            use_cache=False,
        )
    ).eval()


def _clip_encoder(
    vocab_size: int, hidden: int, layers: int, heads: int, projection: int
) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            projection_dim=projection,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()


def _vae(latent_channels: int, blocks: tuple[int, ...], layers: int, groups: int, sd3: bool) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * len(blocks),
        up_block_types=("UpDecoderBlock2D",) * len(blocks),
        layers_per_block=layers,
        norm_num_groups=groups,
        sample_size=1024,
        # SDXL VAE (PixArt-Σ) / SD3 VAE scaling constants.
        scaling_factor=1.5305 if sd3 else 0.13025,
        shift_factor=0.0609 if sd3 else None,
        use_quant_conv=not sd3,
        use_post_quant_conv=not sd3,
    ).eval()


def pixart_scheduler() -> DPMSolverMultistepScheduler:
    # PixArt-Σ's published scheduler config: DPM-Solver++ (2M), linear betas, epsilon prediction.
    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        timestep_spacing="linspace",
        final_sigmas_type="zero",
    )


def sd3_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def pixart_pipeline(
    *,
    width: int,
    heads: int,
    head_dim: int,
    layers: int,
    sample_size: int,
    t5_width: int,
    t5_layers: int,
    t5_heads: int,
    t5_ff: int,
    vae_blocks=(),
    vae_layers: int = 0,
    vae_groups: int = 0,
    seed: int,
    vae: AutoencoderKL | None = None,
) -> PixArtSigmaPipeline:
    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    text_encoder = _t5_encoder(len(tokenizer), t5_width, t5_layers, t5_heads, t5_ff)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        cross_attention_dim=width,
        caption_channels=t5_width,
        sample_size=sample_size,
        attention_bias=True,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
        interpolation_scale=max(sample_size // 64, 1),
    ).eval()
    if vae is None:  # a random VAE of this layout (built after the transformer: the presets' weights depend on it)
        vae = _vae(4, tuple(vae_blocks), vae_layers, vae_groups, sd3=False)
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=pixart_scheduler()
    )


def sd3_pipeline(
    *,
    heads: int,
    head_dim: int,
    layers: int,
    dual_layers: tuple[int, ...],
    sample_size: int,
    pos_embed_max_size: int,
    clip_widths: tuple[int, int],
    clip_layers: int,
    clip_heads: tuple[int, int],
    t5_width: int,
    t5_layers: int,
    t5_heads: int,
    t5_ff: int,
    vae_blocks=(),
    vae_layers: int = 0,
    vae_groups: int = 0,
    seed: int,
    vae: AutoencoderKL | None = None,
) -> StableDiffusion3Pipeline:
    torch.manual_seed(seed)
    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    clip_l = _clip_encoder(len(clip_tok), clip_widths[0], clip_layers, clip_heads[0], clip_widths[0])
    clip_g = _clip_encoder(len(clip_tok), clip_widths[1], clip_layers, clip_heads[1], clip_widths[1])
    t5 = _t5_encoder(len(t5_tok), t5_width, t5_layers, t5_heads, t5_ff)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=t5_width,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=sum(clip_widths),
        pos_embed_max_size=pos_embed_max_size,
        dual_attention_layers=dual_layers,
        qk_norm="rms_norm",
    ).eval()
    if vae is None:
        vae = _vae(16, tuple(vae_blocks), vae_layers, vae_groups, sd3=True)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=sd3_scheduler(),
        vae=vae,
        text_encoder=clip_l,
        tokenizer=clip_tok,
        text_encoder_2=clip_g,
        tokenizer_2=clip_tok,
        text_encoder_3=t5,
        tokenizer_3=t5_tok,
    )


SHAPES_FAMILIES = {"shapes-pixart": "pixart", "shapes-sd3": "sd3"}  # shipped teacher -> family


def shipped_shapes_folder(name: str) -> Path | None:
    """The folder a shapes preset ships in (models/assets/shapes/NAME), None for any other preset."""
    if not any(name.startswith(t) for t in SHAPES_FAMILIES):
        return None
    return Path(str(resources.files("edit_mobile.models").joinpath("assets/shapes"))) / name


def shipped_shapes(name: str):
    """A shapes preset (models/shapes.py, docs/shapes.md) from the folders shipped in models/assets/shapes.

    Teachers are whole diffusers pipeline folders; a student folder holds only its transformer, and shares the
    teacher's text encoders, tokenizers, VAE and scheduler (as `edit-mobile convert` + `distill` leave them)."""
    from diffusers import DiffusionPipeline

    from ..runtime.errors import UserError
    from .edit_pixart import EDiTPixArtTransformer2DModel
    from .mm_edit_sd3 import MMEDiTSD3Transformer2DModel

    root = shipped_shapes_folder(name).parent
    teacher = next(t for t in SHAPES_FAMILIES if name.startswith(t))
    if not (root / teacher / "model_index.json").is_file() or not (root / name).is_dir():
        raise UserError(
            f"preset {name}: its weights are not in this installation ({root / name}); "
            f"`python scripts/train_shapes.py` trains them"
        )
    if name == teacher:
        return DiffusionPipeline.from_pretrained(root / teacher)
    student_cls = EDiTPixArtTransformer2DModel if SHAPES_FAMILIES[teacher] == "pixart" else MMEDiTSD3Transformer2DModel
    student = student_cls.from_pretrained(root / name, subfolder="transformer")
    return DiffusionPipeline.from_pretrained(root / teacher, transformer=student)


@dataclass(frozen=True)
class Preset:
    name: str
    family: str  # "pixart" or "sd3": which teacher architecture and pipeline class
    description: str
    build: Callable[[], object]
    default_resolution: int


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "shapes-pixart-edit",
            "pixart",
            "EDiT student of shapes-pixart (converted + distilled), trained weights, 64 px; the demo's model",
            lambda: shipped_shapes("shapes-pixart-edit"),
            64,
        ),
        Preset(
            "shapes-pixart",
            "pixart",
            "PixArt-Σ trained from scratch on procedural shapes (docs/shapes.md), 64 px",
            lambda: shipped_shapes("shapes-pixart"),
            64,
        ),
        Preset(
            "shapes-sd3-mm-edit",
            "sd3",
            "MM-EDiT student of shapes-sd3 (converted + distilled), trained weights, 64 px",
            lambda: shipped_shapes("shapes-sd3-mm-edit"),
            64,
        ),
        Preset(
            "shapes-sd3",
            "sd3",
            "SD3.5 (MM-DiT) trained from scratch on procedural shapes (docs/shapes.md), 64 px",
            lambda: shipped_shapes("shapes-sd3"),
            64,
        ),
        Preset(
            "tiny-pixart",
            "pixart",
            "PixArt-Σ pipeline, width 32, 2 layers, tiny T5 and VAE (tests)",
            lambda: pixart_pipeline(
                width=32,
                heads=2,
                head_dim=16,
                layers=2,
                sample_size=32,
                t5_width=32,
                t5_layers=2,
                t5_heads=4,
                t5_ff=64,
                vae_blocks=(8, 16, 32, 32),
                vae_layers=1,
                vae_groups=8,
                seed=0,
            ),
            256,
        ),
        Preset(
            "tiny-sd3",
            "sd3",
            "SD3.5 pipeline, width 32, 2 layers (1 dual-attention), tiny CLIPs/T5/VAE",
            lambda: sd3_pipeline(
                heads=2,
                head_dim=16,
                layers=2,
                dual_layers=(0,),
                sample_size=32,
                pos_embed_max_size=64,
                clip_widths=(32, 32),
                clip_layers=2,
                clip_heads=(4, 4),
                t5_width=64,
                t5_layers=2,
                t5_heads=4,
                t5_ff=128,
                vae_blocks=(8, 16, 32, 32),
                vae_layers=1,
                vae_groups=8,
                seed=0,
            ),
            256,
        ),
        Preset(
            "pixart-sigma-xl",
            "pixart",
            "PixArt-Σ-XL-2-1024 transformer + SDXL VAE, true size, random weights; T5 at true width, 1 layer",
            lambda: pixart_pipeline(
                width=1152,
                heads=16,
                head_dim=72,
                layers=28,
                sample_size=128,
                t5_width=4096,
                t5_layers=1,
                t5_heads=64,
                t5_ff=10240,
                vae_blocks=(128, 256, 512, 512),
                vae_layers=2,
                vae_groups=32,
                seed=0,
            ),
            1024,
        ),
        Preset(
            "sd35-medium",
            "sd3",
            "SD3.5-Medium transformer + SD3 VAE, true size, random weights; CLIP-L/G and T5 at true width, 1-2 layers",
            lambda: sd3_pipeline(
                heads=24,
                head_dim=64,
                layers=24,
                dual_layers=tuple(range(13)),
                sample_size=128,
                pos_embed_max_size=384,
                clip_widths=(768, 1280),
                clip_layers=2,
                clip_heads=(12, 20),
                t5_width=4096,
                t5_layers=1,
                t5_heads=64,
                t5_ff=10240,
                vae_blocks=(128, 256, 512, 512),
                vae_layers=2,
                vae_groups=32,
                seed=0,
            ),
            1024,
        ),
    ]
}
