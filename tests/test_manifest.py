"""Manifest fuzzing: every field of a real tiny package's manifest.json deleted, set to null, to a wrong type, to a
negative or a huge number, to a path that leaves the package -> every command ends with exit 0 (a harmless change)
or with one line and exit 2, never a traceback, and writes nothing."""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest

from edit_mobile.cli.main import main as cli

DELETE = object()
VALUES = [DELETE, None, "x", -1, 10**12, "../../etc/passwd", []]
FREE_FORM = ("validation", "export", "tools", "quantization", "tolerance")  # information only: the runtime reads none


def _paths(node, prefix=()):
    """Every field of the manifest: dict keys, and the first and last element of every list."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            if key not in FREE_FORM:
                yield from _paths(value, (*prefix, key))
    elif isinstance(node, list) and node:
        for i in sorted({0, len(node) - 1}):
            yield (*prefix, i)
            yield from _paths(node[i], (*prefix, i))


def _mutated(manifest: dict, path: tuple, value) -> dict:
    m = copy.deepcopy(manifest)
    parent = m
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return m


@pytest.fixture(scope="module")
def package(tiny_dirs, tmp_path_factory):
    pkg = tmp_path_factory.mktemp("fuzz") / "pkg"
    assert cli(["export", str(tiny_dirs["tiny-pixart-edit-trained"]), "--resolution", "128", "--out", str(pkg)]) == 0
    return pkg


def _one_line_exit_2(capsys, argv) -> bool:
    """Runs the command; True if it refused the package (exit 2, one line), False if it ran; fails otherwise."""
    code = cli(argv)  # an exception other than UserError escapes here and fails the test with the mutation named
    err = capsys.readouterr().err.strip()
    assert code in (0, 2), (argv, code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("edit-mobile ")]
        assert len(lines) == 1 and "Traceback" not in err, err
    return code == 2


def test_every_malformed_field_is_refused_in_one_line(package, tmp_path, capsys):
    original = json.loads((package / "manifest.json").read_text())
    paths = list(_paths(original))
    assert len(paths) > 100  # the walk reaches the components' tensor specs and files
    refused = ran = 0
    for path in paths:
        for value in VALUES:
            if value is DELETE and isinstance(path[-1], int):
                continue
            (package / "manifest.json").write_text(json.dumps(_mutated(original, path, value)))
            png = tmp_path / "x.png"
            if _one_line_exit_2(capsys, ["generate", str(package), "--steps", "1", "--prompt", "a", "--out", str(png)]):
                refused += 1
                assert not png.exists(), path
                # inspect reads the graphs without opening sessions: it may run, but never ends in a traceback
                _one_line_exit_2(capsys, ["inspect", str(package)])
            else:
                ran += 1
                png.unlink()
    (package / "manifest.json").write_text(json.dumps(original))
    # Most mutations break something the runtime needs; a few touch fields it only reports (source, architecture).
    assert refused > 5 * ran, (refused, ran)


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("latent_shape",), [4, 16], "latent_shape: expected a list of 3 positive integers"),
        (("latent_shape",), [4, 16, 10**6], r"latent_shape\[2\]: expected an integer in"),
        (("components", "vae_decoder", "inputs", 0, "shape", 1), "4", r"inputs\[0\].shape\[1\]: expected an integer"),
        (
            ("components", "transformer", "files"),
            "transformer/model.onnx",
            "components.transformer.files: expected an object",
        ),
        (("components", "transformer", "files"), {}, "the sha256 of every file"),
        (("vae",), {"shift_factor": None}, "vae.scaling_factor: expected a finite non-zero number"),
        (("text", "tokenizer", "max_length"), -3, r"text.tokenizer.max_length: expected an integer in \[1, "),
        (("resolution",), [], "resolution: expected a list of 2 positive integers"),
        (("batch",), 3, "batch / latent_shape: expected the transformer's sample shape"),
        (("components", "text_encoder", "path"), "../../etc/passwd", "leaves the package folder"),
    ],
)
def test_named_field_errors(package, tmp_path, capsys, path, value, message):
    """The error names the field and what was expected (the cases a random mutation once turned into tracebacks)."""
    work = tmp_path / "pkg"
    shutil.copytree(package, work)
    original = json.loads((work / "manifest.json").read_text())
    (work / "manifest.json").write_text(json.dumps(_mutated(original, path, value)))
    for command in (
        ["generate", str(work), "--prompt", "a", "--out", str(tmp_path / "x.png")],
        ["inspect", str(work)],
        ["bench", str(work)],
        ["validate", str(work)],
        ["quantize", str(work), "--precision", "fp16", "--out", str(tmp_path / "q")],
    ):
        assert cli(command) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert re.search(message, err), (command, err)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "q").exists()


def test_truncated_model_file_is_refused(package, tmp_path, capsys):
    work = tmp_path / "pkg"
    shutil.copytree(package, work)
    model = work / "transformer" / "model.onnx"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    assert cli(["generate", str(work), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    assert "sha256 mismatch for transformer/model.onnx" in capsys.readouterr().err


@pytest.mark.parametrize("rel", ["tokenizer/tokenizer.json", "scheduler/scheduler_config.json"])
def test_tampered_tokenizer_or_scheduler_is_refused(package, tmp_path, capsys, rel):
    """Tokenizer and scheduler files are hashed like the models: a changed file is refused in one line naming it."""
    work = tmp_path / "pkg"
    shutil.copytree(package, work)
    (work / rel).write_text((work / rel).read_text().rstrip() + " \n")  # still valid JSON, one more byte
    assert cli(["generate", str(work), "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"sha256 mismatch for {rel}" in err, err
    assert not (tmp_path / "x.png").exists()


def test_manifest_dataclass_round_trip(package):
    from edit_mobile.runtime.manifest import Manifest

    original = json.loads((package / "manifest.json").read_text())
    assert Manifest.from_dict(original).to_dict() == original
