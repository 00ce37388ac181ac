"""Shared fixtures: tiny teacher and converted pipeline folders, built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{'tiny-pixart': teacher folder, 'tiny-pixart-edit': EDiT folder, 'tiny-sd3': ..., 'tiny-sd3-mm-edit': ...}.

    '<name>-trained' folders hold the conversions with random values in the new EDiT layers (as after
    distillation), so that ConvFusion's and the compressors' weights matter in export and validation tests.
    """
    import torch
    from diffusers import DiffusionPipeline

    from edit_mobile.models.convert import convert
    from edit_mobile.models.presets import PRESETS

    root = tmp_path_factory.mktemp("pipelines")
    dirs = {}
    for name, arch in (("tiny-pixart", "edit"), ("tiny-sd3", "mm-edit")):
        PRESETS[name].build().save_pretrained(root / name)
        dirs[name] = root / name
        dirs[f"{name}-{arch}"] = convert(name, arch, root / f"{name}-{arch}")
        pipe = DiffusionPipeline.from_pretrained(dirs[f"{name}-{arch}"])
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for key, param in pipe.transformer.named_parameters():
                if any(n in key for n in ("conv_fusion", "k_compressor", "v_compressor")):
                    param.add_(torch.randn(param.shape, generator=generator) * 0.1)
        pipe.save_pretrained(root / f"{name}-{arch}-trained")
        dirs[f"{name}-{arch}-trained"] = root / f"{name}-{arch}-trained"
    return dirs
