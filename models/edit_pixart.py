"""EDiT transformer for PixArt-Σ: diffusers' `PixArtTransformer2DModel` with linear compressed self-attention.

Only the self-attention of each block changes (an `EDiTAttnProcessor` plus ConvFusion / Spatial Compressor layers
attached to `attn1`); cross-attention to the prompt stays softmax. The class keeps every constructor argument of
its parent and adds `edit_config`, so `save_pretrained` / `from_pretrained` restore the EDiT attention.
"""

from __future__ import annotations

from diffusers import PixArtTransformer2DModel
from diffusers.configuration_utils import register_to_config

# diffusers finds a component's loading method by looking its base classes up in the class's module namespace
# (model_index.json names this module): it must expose ModelMixin or from_pretrained says "cannot be loaded".
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from .edit_attention import EDiTAttnProcessor, EDiTConfig, GridAwareAttnProcessor, add_edit_layers


class EDiTPixArtTransformer2DModel(PixArtTransformer2DModel):
    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: int | None = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        cross_attention_dim: int | None = 1152,
        attention_bias: bool = True,
        sample_size: int = 128,
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: int | None = 1000,
        upcast_attention: bool = False,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        interpolation_scale: int | None = None,
        use_additional_conditions: bool | None = None,
        caption_channels: int | None = None,
        attention_type: str | None = "default",
        edit_config: dict | None = None,
    ):
        super().__init__(
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            dropout=dropout,
            norm_num_groups=norm_num_groups,
            cross_attention_dim=cross_attention_dim,
            attention_bias=attention_bias,
            sample_size=sample_size,
            patch_size=patch_size,
            activation_fn=activation_fn,
            num_embeds_ada_norm=num_embeds_ada_norm,
            upcast_attention=upcast_attention,
            norm_type=norm_type,
            norm_elementwise_affine=norm_elementwise_affine,
            norm_eps=norm_eps,
            interpolation_scale=interpolation_scale,
            use_additional_conditions=use_additional_conditions,
            caption_channels=caption_channels,
            attention_type=attention_type,
        )
        self.edit = EDiTConfig.from_dict(edit_config)
        for block in self.transformer_blocks:
            add_edit_layers(block.attn1, self.edit)
        self.set_edit_processors()

    def set_edit_processors(self) -> None:
        """The attention implementation is injected here, per module (never a global switch)."""
        for block in self.transformer_blocks:
            block.attn1.set_processor(EDiTAttnProcessor(self.edit))
            if block.attn2 is not None:
                block.attn2.set_processor(GridAwareAttnProcessor())

    def forward(self, hidden_states, *args, cross_attention_kwargs=None, **kwargs):
        # hidden_states: (B, C_lat, H_lat, W_lat); the EDiT convolutions need the token grid (h, w).
        p = self.config.patch_size
        grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
        cross_attention_kwargs = {**(cross_attention_kwargs or {}), "grid_size": grid}
        return super().forward(hidden_states, *args, cross_attention_kwargs=cross_attention_kwargs, **kwargs)

    @classmethod
    def from_teacher(cls, teacher: PixArtTransformer2DModel, edit: EDiTConfig | None = None):
        """Convert: copy every teacher weight; the new EDiT layers keep their teacher-preserving init."""
        if type(teacher) is not PixArtTransformer2DModel:
            raise TypeError(f"expected a PixArtTransformer2DModel teacher, got {type(teacher).__name__}")
        config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
        student = cls(**config, edit_config=(edit or EDiTConfig()).to_dict())
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        new_layers = ("conv_fusion", "k_compressor", "v_compressor")
        if unexpected or any(not any(n in k for n in new_layers) for k in missing):
            raise RuntimeError(f"weight copy mismatch: missing={missing} unexpected={unexpected}")
        return student
