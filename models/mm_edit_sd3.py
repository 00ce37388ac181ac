"""MM-EDiT transformer for SD3 / SD3.5: diffusers' `SD3Transformer2DModel` with hybrid joint attention.

Each block's joint attention gets an `MMEDiTAttnProcessor` (linear image<->image, softmax wherever the prompt is
involved); SD3.5's image-only second attention (`attn2`, the dual-attention layers) becomes EDiT linear
attention. The class keeps every constructor argument of its parent and adds `edit_config`.
"""

from __future__ import annotations

from diffusers import SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config

# diffusers looks base classes up in this module's namespace when loading a pipeline component (see edit_pixart).
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401

from .edit_attention import EDiTAttnProcessor, EDiTConfig, add_edit_layers
from .mm_edit_attention import MMEDiTAttnProcessor


class MMEDiTSD3Transformer2DModel(SD3Transformer2DModel):
    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        edit_config: dict | None = None,
    ):
        super().__init__(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            caption_projection_dim=caption_projection_dim,
            pooled_projection_dim=pooled_projection_dim,
            out_channels=out_channels,
            pos_embed_max_size=pos_embed_max_size,
            dual_attention_layers=dual_attention_layers,
            qk_norm=qk_norm,
        )
        self.edit = EDiTConfig.from_dict(edit_config)
        for block in self.transformer_blocks:
            add_edit_layers(block.attn, self.edit)
            if block.attn2 is not None and self.edit.convert_dual_attention:
                add_edit_layers(block.attn2, self.edit)
        self.set_edit_processors()

    def set_edit_processors(self) -> None:
        for block in self.transformer_blocks:
            block.attn.set_processor(MMEDiTAttnProcessor(self.edit))
            if block.attn2 is not None and self.edit.convert_dual_attention:
                block.attn2.set_processor(EDiTAttnProcessor(self.edit))

    def forward(self, hidden_states, *args, joint_attention_kwargs=None, **kwargs):
        # hidden_states: (B, C_lat, H_lat, W_lat); the EDiT convolutions need the token grid (h, w).
        p = self.config.patch_size
        grid = (hidden_states.shape[-2] // p, hidden_states.shape[-1] // p)
        joint_attention_kwargs = {**(joint_attention_kwargs or {}), "grid_size": grid}
        return super().forward(hidden_states, *args, joint_attention_kwargs=joint_attention_kwargs, **kwargs)

    @classmethod
    def from_teacher(cls, teacher: SD3Transformer2DModel, edit: EDiTConfig | None = None):
        """Convert: copy every teacher weight; the new EDiT layers keep their teacher-preserving init."""
        if type(teacher) is not SD3Transformer2DModel:
            raise TypeError(f"expected an SD3Transformer2DModel teacher, got {type(teacher).__name__}")
        config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
        student = cls(**config, edit_config=(edit or EDiTConfig()).to_dict())
        missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
        new_layers = ("conv_fusion", "k_compressor", "v_compressor")
        if unexpected or any(not any(n in k for n in new_layers) for k in missing):
            raise RuntimeError(f"weight copy mismatch: missing={missing} unexpected={unexpected}")
        return student
