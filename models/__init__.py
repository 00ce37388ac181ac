"""PyTorch side: EDiT / MM-EDiT attention, transformer classes, presets, conversion, distillation.

Importing this package registers the EDiT transformer classes of every family (models/families.py) with Python,
which diffusers (>= 0.42) requires before `from_pretrained` of a converted pipeline folder: it resolves a
component's module from `sys.modules` only, never importing a module just because a `model_index.json` names it.
"""

from . import families  # noqa: F401  (imports every family's student class: models/families.py)
from .edit_attention import EDiTConfig
from .edit_pixart import EDiTPixArtTransformer2DModel
from .mm_edit_sd3 import MMEDiTSD3Transformer2DModel

__all__ = ["EDiTConfig", "EDiTPixArtTransformer2DModel", "MMEDiTSD3Transformer2DModel"]
