"""Shared fixtures: tiny teacher and converted pipeline folders, built once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{'tiny-pixart': teacher folder, 'tiny-pixart-edit': EDiT folder, 'tiny-sd3': ..., 'tiny-sd3-mm-edit': ...}."""
    from edit_mobile.models.convert import convert
    from edit_mobile.models.presets import PRESETS

    root = tmp_path_factory.mktemp("pipelines")
    dirs = {}
    for name, arch in (("tiny-pixart", "edit"), ("tiny-sd3", "mm-edit")):
        PRESETS[name].build().save_pretrained(root / name)
        dirs[name] = root / name
        dirs[f"{name}-{arch}"] = convert(name, arch, root / f"{name}-{arch}")
    return dirs
