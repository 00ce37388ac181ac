"""The torch-free runtime: package loading and verification, backends, tokenizer parity, generation."""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

from edit_mobile.runtime.errors import UserError
from edit_mobile.runtime.package import load_package, sha256_file, write_validation


# --- (a) no torch ------------------------------------------------------------------------------------------------
def test_runtime_and_generate_import_without_torch():
    code = (
        "import edit_mobile.runtime.pipeline, edit_mobile.runtime.backends, edit_mobile.runtime.tokenizer, "
        "edit_mobile.runtime.package, edit_mobile.cli.generate, sys; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "argv", [["export", "tiny-pixart", "--out", "x"], ["convert", "tiny-pixart", "--arch", "edit", "--out", "x"]]
)
def test_torch_commands_in_the_base_install_name_the_extra(argv):
    """Without torch (the base install), a command that needs it says so in one line, exit 2, no traceback."""
    code = (
        "import sys; sys.modules.update(torch=None, diffusers=None, transformers=None); "
        "from edit_mobile.cli.main import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "pip install 'edit-mobile[torch]'" in err


# --- tiny ONNX model and fake package ----------------------------------------------------------------------------
def tiny_model(path: Path) -> Path:
    """x float32 (1,4) -> y = Relu(x); ids int64 (1,3) -> z = ids."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Identity", ["ids"], ["z"])],
        "tiny",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("z", TensorProto.INT64, [1, 3]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


SPECS = [{"name": "x", "shape": [1, 4], "dtype": "float32"}, {"name": "ids", "shape": [1, 3], "dtype": "int64"}]


def fake_package(root: Path, **overrides) -> Path:
    from tokenizers import Tokenizer, models

    model = tiny_model(root / "text_encoder" / "model.onnx")
    (root / "tokenizer").mkdir()
    Tokenizer(models.WordLevel({"<pad>": 0, "a": 1, "<unk>": 2}, unk_token="<unk>")).save(
        str(root / "tokenizer" / "tokenizer.json")
    )
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0})
    )
    manifest = {
        "schema_version": 1,
        "source": "fake",
        "family": "sd3",
        "architecture": "X",
        "target": "onnx",
        "resolution": [64, 64],
        "batch": 1,
        "latent_shape": [16, 8, 8],
        "vae": {"scaling_factor": 1.5, "shift_factor": 0.06},
        "transformer_out_channels": 16,
        "text": {
            "tokenizer": {
                "path": "tokenizer",
                "max_length": 8,
                "pad_id": 0,
                "component": "text_encoder",
                "files": {"tokenizer/tokenizer.json": sha256_file(root / "tokenizer" / "tokenizer.json")},
            }
        },
        "scheduler": {
            "path": "scheduler/scheduler_config.json",
            "files": {"scheduler/scheduler_config.json": sha256_file(root / "scheduler" / "scheduler_config.json")},
        },
        "components": {
            "text_encoder": {
                "path": "text_encoder/model.onnx",
                "files": {"text_encoder/model.onnx": sha256_file(model)},
                "precision": "fp32",
                "opset": 17,
                "inputs": SPECS,
                "outputs": [
                    {"name": "y", "shape": [1, 4], "dtype": "float32"},
                    {"name": "z", "shape": [1, 3], "dtype": "int64"},
                ],
                "tolerance": {},
            }
        },
        "tools": {},
        "validation": None,
    }
    manifest.update(overrides)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def edit_manifest(root: Path, fn) -> None:
    m = json.loads((root / "manifest.json").read_text())
    fn(m)
    (root / "manifest.json").write_text(json.dumps(m))


# --- (c) package loading ----------------------------------------------------------------------------------------
def test_fake_package_loads(tmp_path):
    pkg = load_package(fake_package(tmp_path))
    assert pkg.family == "sd3" and pkg.resolution == (64, 64) and pkg.latent_shape == (16, 8, 8)
    assert pkg.component_path("text_encoder") == (tmp_path / "text_encoder" / "model.onnx").resolve()
    assert [s.name for s in pkg.input_specs("text_encoder")] == ["x", "ids"]
    assert pkg.output_names("text_encoder") == ["y", "z"]
    assert pkg.text_for("text_encoder").max_length == 8
    assert pkg.scheduler_config()["shift"] == 3.0


def test_missing_manifest(tmp_path):
    with pytest.raises(UserError, match="not an edit-mobile package: manifest.json missing"):
        load_package(tmp_path)


def test_unknown_schema_version(tmp_path):
    fake_package(tmp_path, schema_version=7)
    with pytest.raises(UserError, match=r"schema_version 7 .*version 1"):
        load_package(tmp_path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["components"]["text_encoder"].update(path="../outside.onnx"),
        lambda m: m["components"]["text_encoder"].update(path="/etc/passwd"),
        lambda m: m["components"]["text_encoder"]["files"].update({"../../x": "0" * 64}),
        lambda m: m["text"]["tokenizer"].update(path="tokenizer/../../tok"),
        lambda m: m["scheduler"].update(path="../scheduler_config.json"),
    ],
    ids=["component", "absolute", "files", "tokenizer", "scheduler"],
)
def test_path_escaping_the_package_is_refused(tmp_path, edit):
    root = fake_package(tmp_path / "pkg")
    edit_manifest(root, edit)
    with pytest.raises(UserError, match="leaves the package folder"):
        load_package(root)


def test_symlink_escaping_the_package_is_refused(tmp_path):
    root = fake_package(tmp_path / "pkg")
    outside = tiny_model(tmp_path / "outside.onnx")
    (root / "text_encoder" / "model.onnx").unlink()
    (root / "text_encoder" / "model.onnx").symlink_to(outside)
    with pytest.raises(UserError, match="leaves the package folder"):
        load_package(root)


def test_sha256_mismatch_after_one_changed_byte(tmp_path):
    root = fake_package(tmp_path)
    model = root / "text_encoder" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(
        UserError, match="sha256 mismatch for text_encoder/model.onnx: the package is corrupted or was modified"
    ):
        load_package(root)
    load_package(root, verify=False)  # explicit opt-out still loads


def test_missing_file(tmp_path):
    root = fake_package(tmp_path)
    (root / "text_encoder" / "model.onnx").unlink()
    with pytest.raises(UserError, match="text_encoder/model.onnx is missing"):
        load_package(root)


def test_write_validation_is_atomic_and_keeps_hashes(tmp_path):
    root = fake_package(tmp_path)
    pkg = load_package(root)
    write_validation(pkg, {"ok": True, "image_psnr": 40.5})
    assert pkg.validation == {"ok": True, "image_psnr": 40.5}
    assert load_package(root).validation == {"ok": True, "image_psnr": 40.5}
    assert not (root / "manifest.json.tmp").exists()
    with pytest.raises(TypeError):
        write_validation(root, {"bad": object()})
    assert load_package(root).validation == {"ok": True, "image_psnr": 40.5}
    assert not (root / "manifest.json.tmp").exists()


# --- (d) backends -----------------------------------------------------------------------------------------------
@pytest.fixture
def ort_backend(tmp_path):
    from edit_mobile.runtime.backends import create_backend

    return create_backend("ort", tiny_model(tmp_path / "m.onnx"), SPECS, ["y", "z"], threads=1)


def good_inputs():
    return {"x": np.array([[-1, 2, -3, 4]], dtype=np.float32), "ids": np.array([[5, 6, 7]], dtype=np.int64)}


def test_ort_backend_runs(ort_backend):
    out = ort_backend.run(good_inputs())
    np.testing.assert_array_equal(out["y"], [[0, 2, 0, 4]])
    np.testing.assert_array_equal(out["z"], [[5, 6, 7]])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(x=np.zeros((1, 5), np.float32)), r"input 'x' has shape \(1, 5\), expected \(1, 4\)"),
        (lambda d: d.update(x=np.zeros((4,), np.float32)), r"input 'x' has shape \(4,\)"),
        (lambda d: d.update(x=np.zeros((1, 4), np.float64)), r"input 'x' has dtype float64, expected float32"),
        (lambda d: d.update(ids=np.zeros((1, 3), np.int32)), r"input 'ids' has dtype int32, expected int64"),
        (lambda d: d.pop("ids"), r"missing input\(s\) ids"),
        (lambda d: d.update(w=np.zeros(1, np.float32)), r"unexpected input\(s\) w"),
    ],
    ids=["shape", "rank", "dtype-float", "dtype-int", "missing", "extra"],
)
def test_ort_backend_checks_inputs(ort_backend, change, message):
    inputs = good_inputs()
    change(inputs)
    with pytest.raises(ValueError, match=message):
        ort_backend.run(inputs)


def test_backend_factory_errors(tmp_path):
    from edit_mobile.runtime.backends import create_backend

    model = tiny_model(tmp_path / "m.onnx")
    with pytest.raises(
        UserError, match=r"unknown backend 'tflite' \(choose from ort, coreml, coreml-reference, executorch\)"
    ):
        create_backend("tflite", model, SPECS, ["y"])
    for name in ("coreml", "coreml-reference"):  # an ONNX model given to a Core ML backend
        with pytest.raises(UserError, match=r"is not a Core ML model \(\.mlpackage\)"):
            create_backend(name, model, SPECS, ["y"])
    with pytest.raises(UserError, match=r"is not an ExecuTorch program \(\.pte\)"):
        create_backend("executorch", model, SPECS, ["y"])
    with pytest.raises(UserError, match=r"NoSuchExecutionProvider not available here \(available: .*CPU"):
        create_backend("ort", model, SPECS, ["y"], providers=["NoSuchExecutionProvider"])
    with pytest.raises(UserError, match="unknown ONNX Runtime optimization level"):
        create_backend("ort", model, SPECS, ["y"], optimization="max")
    with pytest.raises(UserError, match="do not match the manifest"):
        create_backend("ort", model, SPECS[:1], ["y"])


def test_backend_registry(tmp_path):
    """Backends are chosen by name from one registry; which one runs a target is the registry's answer."""
    from edit_mobile.runtime.backends import BACKENDS, backend_for_target, create_backend

    assert list(BACKENDS) == ["ort", "coreml", "coreml-reference", "executorch"]
    assert backend_for_target("onnx") == backend_for_target("ort-mobile") == "ort"
    assert backend_for_target("executorch") == "executorch"
    assert backend_for_target("coreml", platform="darwin") == "coreml"
    assert backend_for_target("coreml", platform="linux") == "coreml-reference"
    for cls in BACKENDS.values():
        assert {"name", "targets", "platforms", "options", "manifest_options", "run"} <= set(dir(cls))
    model = tiny_model(tmp_path / "m.onnx")
    # an option of another backend is ignored (Core ML has no thread setting); one no backend takes is an error
    with pytest.raises(UserError, match=r"is not a Core ML model"):
        create_backend("coreml-reference", model, SPECS, ["y"], threads=2, optimization="all")
    with pytest.raises(TypeError, match="unknown option"):
        create_backend("ort", model, SPECS, ["y"], thread=2)
    assert create_backend("ort", model, SPECS, ["y"], compute_units="CPU_ONLY").output_names == ["y"]


def test_runtime_and_mil_import_no_backend_circle():
    """The MIL executor knows nothing about backends; the backends do not import the registry."""
    import ast
    from pathlib import Path

    import edit_mobile.runtime as runtime

    root = Path(runtime.__file__).parent
    for path in [*sorted((root / "mil").glob("*.py")), root / "ort_backend.py", root / "coreml_backend.py"]:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                imported.add((node.level, node.module or ""))
        assert not any(m in ("backends", "coreml_reference") for _, m in imported), (path, imported)
        if path.parent.name == "mil":
            assert not any("backend" in m or m == "io_specs" for _, m in imported), (path, imported)


# --- (b) tokenizer parity with transformers ---------------------------------------------------------------------
LONG = (
    "a photograph of an astronaut riding a horse on the surface of the moon, highly detailed, dramatic lighting, 8k, "
) * 12

PROMPTS = [
    "a cat",
    "",
    "  A Red   Fox in the SNOW, über café!  ",
    "numbers 123 and 4.5, tabs\tand\nnewlines",
    "unknown ☃ symbols ✓",
    LONG,
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    from edit_mobile.models.presets import build_clip_tokenizer, build_t5_tokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    t5, clip = build_t5_tokenizer(), build_clip_tokenizer()
    t5.save_pretrained(root / "t5")
    clip.save_pretrained(root / "clip")
    return {"t5": (root / "t5", t5), "clip": (root / "clip", clip)}


@pytest.mark.parametrize("kind, max_length", [("t5", 300), ("t5", 16), ("clip", 77), ("clip", 12)])
def test_tokenizer_matches_transformers(tokenizer_dirs, caplog, kind, max_length):
    from edit_mobile.runtime.tokenizer import PromptTokenizer

    path, ref = tokenizer_dirs[kind]
    ours = PromptTokenizer(path, max_length, ref.pad_token_id)
    for prompt in PROMPTS:
        expected = ref(prompt, padding="max_length", max_length=max_length, truncation=True)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edit_mobile.runtime.tokenizer"):
            enc = ours.encode(prompt)
        assert enc.input_ids.dtype == np.int64 and enc.input_ids.shape == (1, max_length)
        assert enc.input_ids[0].tolist() == expected["input_ids"], prompt
        assert enc.attention_mask[0].tolist() == expected["attention_mask"], prompt
        too_long = len(ref(prompt).input_ids) > max_length
        assert (enc.truncated_text is not None) == too_long, prompt
        warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
        assert len(warnings) == int(too_long), prompt
        if too_long:
            assert enc.truncated_text.strip() and enc.truncated_text in warnings[0].getMessage()
    assert ours.encode(LONG).truncated_text  # LONG exceeds every length above


# --- generation -------------------------------------------------------------------------------------------------
def test_save_png_is_atomic_and_lossless(tmp_path):
    import torch  # the reference only: the runtime itself must not import torch
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    from edit_mobile.runtime.pipeline import save_png, to_uint8

    decoded = np.random.default_rng(0).uniform(-1.2, 1.2, (1, 3, 8, 6)).astype(np.float32)
    # Hand-checked pixels (channel 0, row 0): the ends of [-1, 1], out-of-range values (clipped), the midpoint
    # (0 -> 127.5, which rounds half to even: 128) and 0.5 -> 191.25 -> 191.
    decoded[0, 0, 0] = [-1.0, 1.0, -5.0, 5.0, 0.0, 0.5]
    image = to_uint8(decoded)
    assert image.shape == (8, 6, 3) and image.dtype == np.uint8
    assert image[0, :, 0].tolist() == [0, 255, 0, 255, 128, 191]
    # The reference is diffusers' own post-processing, the two calls its pipelines make for output_type="pil":
    # postprocess (denormalize: x * 0.5 + 0.5 clamped to [0, 1], then NCHW -> NHWC float) and numpy_to_pil
    # ((x * 255).round().astype("uint8"), diffusers 0.42). Equal bytes: a PNG from the runtime is the image
    # diffusers would have saved from the same decoder output.
    as_np = VaeImageProcessor().postprocess(torch.from_numpy(decoded), output_type="np")
    assert as_np.shape == (1, 8, 6, 3)
    expected = np.asarray(VaeImageProcessor.numpy_to_pil(as_np)[0])
    assert expected.dtype == np.uint8 and expected[0, :, 0].tolist() == [0, 255, 0, 255, 128, 191]
    np.testing.assert_array_equal(image, expected)

    save_png(image, tmp_path / "x.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "x.png")), image)  # lossless round trip
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # atomic: no temporary file left behind
    with pytest.raises(UserError, match="does not exist"):
        save_png(image, tmp_path / "nope" / "x.png")


@pytest.mark.slow
def test_export_then_generate_is_deterministic(tmp_path, capsys):
    from edit_mobile.cli.main import main

    pkg = tmp_path / "pkg"
    assert main(["export", "tiny-pixart", "--target", "onnx", "--resolution", "256", "--out", str(pkg)]) == 0
    args = ["generate", str(pkg), "--prompt", "a red fox in the snow", "--steps", "3", "--seed", "7"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    assert main([*args, "--out", str(tmp_path / "b.png"), "--resolution", "256"]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert main([*args, "--out", str(tmp_path / "c.png"), "--seed", "8"]) == 0
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()

    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "d.png"), "--size", "128x512"]) == 2
    assert "128x512 bins to 128x512" in capsys.readouterr().err  # a PixArt-Σ bucket the package lacks
    assert not (tmp_path / "d.png").exists()

    # the recorded trajectory and inputs (what validation compares) are consistent with the image
    from edit_mobile.runtime.pipeline import Text2ImagePipeline, initial_noise

    pipe = Text2ImagePipeline(pkg, progress=False)
    res = pipe("a red fox in the snow", steps=3, seed=7, record=True)
    assert len(res.latents) == 3 and len(res.transformer_inputs) == 3 and len(res.noise_preds) == 3
    step0 = res.transformer_inputs[0][0]  # batch-2 package: one call per step, uncond first
    assert step0["sample"].shape == (2, 4, 32, 32) and step0["timestep"].dtype == np.float32
    np.testing.assert_array_equal(res.initial_latents, initial_noise(pipe.package, 7))  # DPM init_noise_sigma 1
    again = pipe("a red fox in the snow", steps=3, latents=initial_noise(pipe.package, 7))
    np.testing.assert_array_equal(again.image, res.image)
    # a dropped pipeline frees its sessions at once, not when the garbage collector next runs (a reference cycle
    # held PixArt-Σ-XL's 7 GB of sessions per size through a multi-size calibration)
    sessions = [weakref.ref(b.session) for b in pipe.models.values()]
    gc.disable()
    try:
        del pipe
        assert sessions and all(s() is None for s in sessions)
    finally:
        gc.enable()

    # --memory low: each component is created when first needed and released when the loop is done with it; at
    # most one component is alive at any time, and the image is the same
    assert main([*args, "--memory", "low", "--out", str(tmp_path / "low.png")]) == 0
    assert (tmp_path / "low.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    low = Text2ImagePipeline(pkg, progress=False, memory="low")
    alive = []
    real = low._backend
    low._backend = lambda name: alive.append(sorted({*low.models, name})) or real(name)
    np.testing.assert_array_equal(low("a red fox in the snow", steps=3, seed=7).image, res.image)
    assert max(len(a) for a in alive) == 1 and not low.models
    capsys.readouterr()
    assert main([*args, "--memory", "tiny", "--out", str(tmp_path / "e.png")]) == 2
    assert "unknown memory mode 'tiny'" in capsys.readouterr().err and not (tmp_path / "e.png").exists()

    # --shared-arena: every session allocates from ONNX Runtime's one environment arena; the same image
    assert main([*args, "--shared-arena", "--out", str(tmp_path / "shared.png")]) == 0
    assert (tmp_path / "shared.png").read_bytes() == (tmp_path / "a.png").read_bytes()
    shared = Text2ImagePipeline(pkg, progress=False, shared_arena=True)
    configs = {b.session.get_session_options().get_session_config_entry("session.use_env_allocators")
               for b in shared.models.values()}  # fmt: skip
    assert configs == {"1"}
    assert main([*args, "--shared-arena", "--no-cpu-arena", "--out", str(tmp_path / "f.png")]) == 2
    assert "--shared-arena needs the CPU arena" in capsys.readouterr().err and not (tmp_path / "f.png").exists()

    # ONNX Runtime's memory pattern is off unless asked for (its one block per run costs up to 1.8x the peak,
    # docs/memory.md); `--mem-pattern` turns it on, and the image is the same
    def patterns(pipe):
        return {b.session.get_session_options().enable_mem_pattern for b in pipe.models.values()}

    assert patterns(Text2ImagePipeline(pkg, progress=False)) == {False}
    assert patterns(Text2ImagePipeline(pkg, progress=False, mem_pattern=True)) == {True}
    assert main([*args, "--mem-pattern", "--out", str(tmp_path / "pattern.png")]) == 0
    assert (tmp_path / "pattern.png").read_bytes() == (tmp_path / "a.png").read_bytes()
