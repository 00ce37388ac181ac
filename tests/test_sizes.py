"""Multi-size packages (`export --resolution A --resolution B ...`): one static transformer and VAE graph per size,
the weights stored once, every size generating and validating (docs/resolutions.md)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from edit_mobile.cli.main import main as cli
from edit_mobile.export.package import export_package
from edit_mobile.export.validate import ValidationOptions, validate
from edit_mobile.runtime.errors import UserError
from edit_mobile.runtime.package import load_package
from edit_mobile.runtime.pipeline import Text2ImagePipeline

SIZES = ["128", "96x160", "160x96"]  # square, portrait (96 wide, 160 high), landscape
MODELS = {"pixart": "tiny-pixart-edit-trained", "sd3": "tiny-sd3-mm-edit-trained"}


def _folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def packages(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    out = {}
    for family, model in MODELS.items():
        out[family] = root / family
        export_package(str(tiny_dirs[model]), out[family], resolution=SIZES, max_text_tokens=32)
        out[f"{family}-single"] = root / f"{family}-single"
        export_package(str(tiny_dirs[model]), out[f"{family}-single"], resolution=SIZES[0], max_text_tokens=32)
    return out


@pytest.mark.parametrize("family", MODELS)
def test_every_size_generates_and_validates(packages, family):
    package = load_package(packages[family])
    assert package.sizes == ["128x128", "96x160", "160x96"]
    for key, (height, width) in zip(package.sizes, [(128, 128), (160, 96), (96, 160)]):
        view = package.at_size(key)
        assert view.resolution == (height, width)
        image = Text2ImagePipeline(view, progress=False)("a red circle", steps=2, seed=0).image
        assert image.shape == (height, width, 3)
    report = validate(str(packages[family]), opts=ValidationOptions(steps=2))
    assert report["passed"] and list(report["sizes"]) == package.sizes
    for key, size_report in report["sizes"].items():
        assert size_report["size"] == key and size_report["image"]["psnr_db"] >= size_report["image"]["gate_db"]
    stored = json.loads((packages[family] / "manifest.json").read_text())["validation"]
    assert stored["passed"] and list(stored["sizes"]) == package.sizes


@pytest.mark.parametrize("family", MODELS)
def test_the_sizes_share_one_copy_of_the_weights(packages, family):
    multi, single = packages[family], packages[f"{family}-single"]
    for name in ("transformer", "vae_decoder"):
        graphs = sorted((multi / name).glob("*.onnx"))
        assert [g.name for g in graphs] == ["model.onnx", "model_160x96.onnx", "model_96x160.onnx"]
        # Every large initializer of every graph reads the one weights file; equal tensors share name and offset.
        seen, users = {}, {}
        for graph in graphs:
            for t in onnx.load(str(graph), load_external_data=False).graph.initializer:
                where = {e.key: e.value for e in t.external_data}
                if where:
                    assert where["location"] == "weights.bin"
                    seen.setdefault(t.name, set()).add(where["offset"])
                    key = (where["offset"], int(where["length"]))
                    users[key] = users.get(key, 0) + 1
        shared = [n for n, offsets in seen.items() if len(offsets) == 1]
        assert len(shared) >= 0.8 * len(seen)
        # The weights file holds one graph's weights plus what depends on the size: the position embedding's row and
        # column parts (models/transformer_chunks.py: SeparablePositions; with the whole folded table per size,
        # the per-size bytes were 9.4 % / 5.8 % of one graph's weights for tiny PixArt / SD3, now 1.9 % / 1.1 %);
        # without sharing, three sizes would store three copies.
        one = sum(len(t.raw_data) for t in onnx.load(str(single / name / "model.onnx")).graph.initializer)
        per_size = sum(length for (_, length), n in users.items() if n < len(graphs))
        assert per_size < 0.03 * one
        assert (multi / name / "weights.bin").stat().st_size < 1.01 * one
        assert _folder_bytes(multi / name) < 0.7 * 3 * _folder_bytes(single / name)
    # The text encoders do not depend on the size: exported once, the same graph as a one-size package's.
    assert (multi / "text_encoder" / "model.onnx").read_bytes() == (single / "text_encoder" / "model.onnx").read_bytes()


def _matmul_graph(path, weights: dict[str, np.ndarray]) -> None:
    """x @ w1 @ w2 ... as an ONNX graph with its weights in its own external data file (as the exporter writes)."""
    from onnx import TensorProto, helper, numpy_helper

    names, prev, nodes = list(weights), "x", []
    for i, name in enumerate(names):
        nodes.append(helper.make_node("MatMul", [prev, name], [f"y{i}"]))
        prev = f"y{i}"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [2, 32])],
        [numpy_helper.from_array(w, name) for name, w in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)


def test_a_further_size_is_appended_to_the_shared_weights(tmp_path):
    """Sizes shared one at a time (what `export` does, so that the disk never holds every size's copy): graphs
    already reading weights.bin keep their tensors where they are; only the new graph's new tensors are appended,
    and its own data file goes."""
    import onnxruntime as ort

    from edit_mobile.export.shared_weights import share_weights

    rng = np.random.default_rng(0)
    w1, w2, w3 = (rng.standard_normal((32, 32)).astype(np.float32) for _ in range(3))
    paths = [tmp_path / f"model_{k}.onnx" for k in range(3)]
    _matmul_graph(paths[0], {"a": w1, "b": w2})
    _matmul_graph(paths[1], {"c": w1, "d": w2})
    first = share_weights(paths[:2])
    before, inode = (tmp_path / "weights.bin").read_bytes(), (tmp_path / "weights.bin").stat().st_ino
    index = json.loads((tmp_path / "weights.json").read_text())["graphs"]["model_0.onnx"]
    _matmul_graph(paths[2], {"e": w1, "f": w3})  # one tensor shared, one new
    second = share_weights(paths)
    after = (tmp_path / "weights.bin").read_bytes()
    assert after[: len(before)] == before and len(after) > len(before)  # appended, nothing moved ...
    assert (tmp_path / "weights.bin").stat().st_ino == inode  # ... in place, not a rewritten copy beside it
    assert json.loads((tmp_path / "weights.json").read_text())["graphs"]["model_0.onnx"] == index
    assert (first["tensors"], second["tensors"]) == (2, 3) and not (tmp_path / "model_2.onnx.data").exists()
    x = rng.standard_normal((2, 32)).astype(np.float32)
    for path, expected in zip(paths, (x @ w1 @ w2, x @ w1 @ w2, x @ w1 @ w3)):
        (out,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_the_default_size_matches_a_single_size_export(packages):
    """Sharing the weights changes where they are stored, not what the graph computes: same image, bit for bit."""
    multi = Text2ImagePipeline(packages["pixart"], progress=False)("a red circle", steps=2, seed=3).image
    single = Text2ImagePipeline(packages["pixart-single"], progress=False)("a red circle", steps=2, seed=3).image
    np.testing.assert_array_equal(multi, single)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["tiny-pixart", "--resolution", "128", "--resolution", "128x128"], "a size is given twice"),
        (["tiny-pixart", "--resolution", "128", "--resolution", "96x150"], "96x150: both sides must be multiples"),
        (["tiny-sd3", "--resolution", "128", "--resolution", "4096x128"], "position embeddings cover"),
    ],
)
def test_bad_sizes_are_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    assert cli(["export", *argv, "--out", str(tmp_path / "pkg")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_sizes_loaded_together_share_one_copy_in_memory(packages):
    """One SharedWeights for the pipelines of every size: their sessions read the same mapped tensors (one OrtValue
    per stored tensor), and the images are those of pipelines without sharing."""
    from edit_mobile.runtime.shared_weights import SharedWeights

    package, shared = load_package(packages["sd3"]), SharedWeights()
    pipes = {
        key: Text2ImagePipeline(package.at_size(key), progress=False, shared_weights=shared) for key in package.sizes
    }
    index = json.loads((packages["sd3"] / "transformer" / "weights.json").read_text())
    offsets = {e["offset"] for graph in index["graphs"].values() for e in graph.values()}
    transformer = [k for k in shared._values if k[0].parent.name == "transformer"]
    assert len(transformer) == len(offsets) < sum(len(g) for g in index["graphs"].values())
    for key, pipe in pipes.items():
        alone = Text2ImagePipeline(package.at_size(key), progress=False)
        np.testing.assert_array_equal(
            pipe("a red circle", steps=2, seed=1).image, alone("a red circle", steps=2, seed=1).image
        )


@pytest.fixture(scope="module")
def coreml_packages(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes-coreml")
    src = str(tiny_dirs["tiny-pixart-edit-trained"])
    for target in ("iOS18", "iOS17"):
        export_package(src, root / target, target="coreml", resolution=SIZES[:2], max_text_tokens=32,
                       deployment_target=target)  # fmt: skip
    export_package(src, root / "single", target="coreml", resolution=SIZES[0], max_text_tokens=32)
    return root


def test_coreml_sizes_are_functions_of_one_program(coreml_packages):
    """iOS18: one multi-function .mlpackage per size-dependent component, its weights stored once; the reference
    executor runs every function, and every size validates."""
    from edit_mobile.runtime.mil import MILProgram

    package = load_package(coreml_packages / "iOS18")
    assert package.sizes == ["128x128", "96x160"]
    for key in package.sizes:
        entry = package.at_size(key).component("transformer").entry
        assert entry.path == "transformer/model.mlpackage" and entry.function == f"image_{key}"
    assert sorted(p.name for p in (coreml_packages / "iOS18" / "transformer").iterdir()) == ["model.mlpackage"]
    program = MILProgram(coreml_packages / "iOS18" / "transformer" / "model.mlpackage", function="image_96x160")
    grid = program.inputs["sample"][1][-2:]  # (dtype, shape): the latents of a 96 wide, 160 high image
    assert grid == tuple(package.at_size("96x160").latent_shape[1:]) and grid[0] > grid[1]
    one = _folder_bytes(coreml_packages / "single" / "transformer")
    assert _folder_bytes(coreml_packages / "iOS18" / "transformer") < 1.2 * one
    report = validate(str(coreml_packages / "iOS18"), opts=ValidationOptions(steps=2))
    assert report["passed"] and list(report["sizes"]) == package.sizes


def test_coreml_before_ios18_keeps_one_program_per_size(coreml_packages):
    folder = coreml_packages / "iOS17" / "transformer"
    assert sorted(p.name for p in folder.iterdir()) == ["model.mlpackage", "model_96x160.mlpackage"]
    manifest = json.loads((coreml_packages / "iOS17" / "manifest.json").read_text())
    assert "multi-function programs need --deployment-target iOS18 or macOS15" in manifest["export"]["sizes"]["weights"]
    assert "function" not in manifest["sizes"]["96x160"]["components"]["transformer"]


@pytest.mark.parametrize("target", ["iOS18", "iOS17"])
def test_coreml_sizes_compress_each_function(coreml_packages, tmp_path, target):
    """Core ML compression of a multi-size package: each size's program (iOS18: each function of the one
    multi-function program, merged again with its weights stored once) compressed and checked on its own size's
    recorded inputs; every size validates."""
    from edit_mobile.export.coreml_export import extract_function
    from edit_mobile.export.coreml_quantize import quantize_coreml_package
    from edit_mobile.runtime.mil import MILProgram

    out = tmp_path / "int8"
    manifest = quantize_coreml_package(coreml_packages / target, out, "int8-weights", components="transformer")
    folder = out / "transformer"
    for key, entry in [("128x128", manifest["components"]["transformer"]),
                       ("96x160", manifest["sizes"]["96x160"]["components"]["transformer"])]:  # fmt: skip
        assert entry["precision"] == "int8-weights" and entry["quantization"]["check"]["psnr_db"] > 35
        assert entry.get("function") == (f"image_{key}" if target == "iOS18" else None)
    if target == "iOS18":
        assert sorted(p.name for p in folder.iterdir()) == ["model.mlpackage"]
        one = extract_function(folder / "model.mlpackage", "image_96x160", tmp_path / "one.mlpackage")
        compressed = [op for op in MILProgram(one).ops if op.type.startswith("constexpr_")]
        assert compressed  # the function's weights are compressed ...
        # ... and stored once for both functions (only the per-size position table differs)
        (merged,), (alone,) = folder.rglob("weight.bin"), one.rglob("weight.bin")
        assert merged.stat().st_size < 1.2 * alone.stat().st_size
    else:
        assert sorted(p.name for p in folder.iterdir()) == ["model.mlpackage", "model_96x160.mlpackage"]
    report = validate(str(out), opts=ValidationOptions(steps=2))
    assert report["passed"] and list(report["sizes"]) == ["128x128", "96x160"]


def test_quantized_sizes_validate_and_share_their_weights(packages, tmp_path):
    """int8 weights of every size, each calibrated at its own size; the graphs share one weights file again."""
    from edit_mobile.export.quantize import quantize_package

    out = tmp_path / "int8"
    manifest = quantize_package(packages["pixart"], out, "int8-weights", components="transformer", calibration_steps=2)
    assert list(manifest["sizes"]) == ["96x160", "160x96"]
    for key in ("96x160", "160x96"):
        assert manifest["sizes"][key]["components"]["transformer"]["precision"] == "int8-weights"
    graphs = sorted(p.name for p in (out / "transformer").glob("*.onnx"))
    assert (
        graphs == ["model.onnx", "model_160x96.onnx", "model_96x160.onnx"]
        and (out / "transformer" / "weights.bin").is_file()
    )
    shared = manifest["components"]["transformer"]["quantization"]["shared_weights"]["transformer"]
    assert shared["bytes"] < 0.5 * shared["bytes_before"]  # three sizes' int8 graphs, their weights stored once
    assert shared["bytes"] < (packages["pixart"] / "transformer" / "weights.bin").stat().st_size  # less than fp32
    report = validate(str(out), opts=ValidationOptions(steps=2))
    assert report["passed"] and list(report["sizes"]) == ["128x128", "96x160", "160x96"]
    for size_report in report["sizes"].values():
        assert size_report["components"]["transformer"]["precision"] == "int8-weights"


def test_chunked_sizes_quantize_chunk_by_chunk(tiny_dirs, tmp_path):
    """A chunked transformer at two sizes: each chunk's graphs of both sizes quantized and sharing one weights file
    in that chunk's folder; both sizes validate."""
    from edit_mobile.export.quantize import quantize_package

    src, fp32, out = str(tiny_dirs["tiny-pixart-edit-trained"]), tmp_path / "fp32", tmp_path / "int8"
    export_package(src, fp32, resolution=SIZES[:2], max_text_tokens=32, transformer_chunks=2)
    manifest = quantize_package(fp32, out, "int8-weights", components="transformer", calibration_steps=2)
    shared = manifest["components"]["transformer"]["quantization"]["shared_weights"]
    assert list(shared) == ["transformer/chunk-00", "transformer/chunk-01"]
    for folder in shared:
        assert sorted(p.name for p in (out / folder).glob("*.onnx")) == ["model.onnx", "model_96x160.onnx"]
        assert shared[folder]["bytes"] < 0.6 * shared[folder]["bytes_before"]
    report = validate(str(out), opts=ValidationOptions(steps=2))
    assert report["passed"] and list(report["sizes"]) == ["128x128", "96x160"]


def test_bench_measures_the_size_asked_for(packages):
    from edit_mobile.runtime.bench import BenchOptions, bench_package

    report = bench_package(packages["pixart"], BenchOptions(runs=1, warmup=0, steps=1, size="160x96"))
    assert report["package"]["resolution"] == [96, 160] and report["package"]["sizes"][2] == "160x96"
    with pytest.raises(UserError, match="no size 64x64"):
        bench_package(packages["pixart"], BenchOptions(runs=1, warmup=0, steps=1, size="64x64"))


def test_generate_names_the_sizes_a_package_has(packages, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert cli(["generate", str(packages["sd3"]), "--size", "64", "--prompt", "x", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no size 64x64; it has 128x128, 96x160, 160x96" in err and not out.exists()
    # PixArt-Σ bins a size it lacks to its buckets (tests/test_binning.py), and names the bucket it would need
    assert cli(["generate", str(packages["pixart"]), "--size", "64", "--prompt", "x", "--out", str(out)]) == 2
    assert "64x64 bins to 256x256" in capsys.readouterr().err and not out.exists()
    assert (
        cli(
            [
                "generate",
                str(packages["pixart"]),
                "--size",
                "96x160",
                "--prompt",
                "x",
                "--steps",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    from PIL import Image

    assert Image.open(out).size == (96, 160)  # PIL: (width, height)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda m: m["sizes"]["96x160"].update(resolution=[96, 160]),
            "sizes.96x160.resolution: expected [height, width]",
        ),
        (lambda m: m["sizes"]["96x160"]["components"].update(unet={}), "sizes.96x160.components: expected graphs of"),
        (lambda m: m["sizes"].update({"128x128": m["sizes"]["96x160"]}), "sizes.128x128"),
    ],
)
def test_malformed_sizes_are_refused_in_one_line(packages, tmp_path, mutate, message):
    bad = tmp_path / "bad"
    shutil.copytree(packages["pixart"], bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    mutate(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_package(bad)
