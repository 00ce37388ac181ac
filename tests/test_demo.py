"""`edit-mobile demo`, the README's main job, end to end on the shipped shapes EDiT student (its accuracy is
checked in tests/test_shipped_shapes.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edit_mobile.cli.main import main as cli


def test_demo_writes_package_grid_and_reports(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--prompts", "8", "--steps", "4"]  # the shipped shapes EDiT student
    assert cli(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["evaluation.json", "grid.png", "package", "validation.json"]
    manifest = json.loads((out / "package" / "manifest.json").read_text())
    assert manifest["text"]["tokenizer"]["max_length"] == 32  # the prompt length the shipped model was trained at
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape[0] > 2 * 160 and grid.shape[1] >= 4 * 160  # 2 rows x 4 columns of captioned tiles
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["target"] == str(out / "package") and evaluation["count"] == 8
    assert all(0 <= v <= 1 for v in evaluation["accuracy"].values())
    assert json.loads((out / "validation.json").read_text())["passed"] is True
    assert "demo done" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folder left


@pytest.mark.parametrize(
    "extra,expected",
    [
        (["--model", "no-such-model"], "is neither a preset"),
        (["--prompts", "4"], "--prompts must be >= 8"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_demo_bad_input_is_one_line_exit_2(tmp_path, capsys, extra, expected):
    out = tmp_path / "demo"
    assert cli(["demo", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.iterdir())  # neither DIR nor a temporary folder
