"""Core ML: export of every component, the numpy reference executor against PyTorch, compression, bad input.

Core ML itself runs only on macOS; everything here except the `macos`-marked test runs on Linux through the
reference executor (runtime/mil).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edit_mobile.cli.main import main as cli
from edit_mobile.runtime.errors import UserError

macos = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")


@pytest.fixture(scope="module")
def packages(tiny_dirs, tmp_path_factory):
    """fp16 Core ML packages of the trained-like EDiT PixArt and MM-EDiT SD3 conversions, through the CLI."""
    root = tmp_path_factory.mktemp("coreml")
    out = {}
    for name, src in (("pixart", "tiny-pixart-edit-trained"), ("sd3", "tiny-sd3-mm-edit-trained")):
        out[name] = root / name
        assert (
            cli(
                [
                    "export",
                    str(tiny_dirs[src]),
                    "--target",
                    "coreml",
                    "--resolution",
                    "256",
                    "--compute-precision",
                    "fp16",
                    "--out",
                    str(out[name]),
                ]
            )
            == 0
        )
    return out


def _validate(pkg: Path, tmp_path: Path) -> dict:
    report_path = tmp_path / f"{pkg.name}-report.json"
    code = cli(["validate", str(pkg), "--steps", "2", "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert code == (0 if report["passed"] else 1)
    return report


@pytest.mark.parametrize("name", ["pixart", "sd3"])
def test_fp16_package_validates_through_the_reference_executor(packages, tmp_path, name):
    pkg = packages[name]
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["target"] == "coreml"
    for comp, entry in manifest["components"].items():
        assert entry["path"] == f"{comp}/model.mlpackage" and entry["precision"] == "fp16"
        assert entry["deployment_target"] == "iOS17"
        assert f"{comp}/model.mlpackage/Data/com.apple.CoreML/model.mlmodel" in entry["files"]
        assert all(len(h) == 64 for h in entry["files"].values())
        assert manifest["export"][comp]["coreml_reference_vs_torch"]["outputs"]
    report = _validate(pkg, tmp_path)
    assert report["passed"], report["components"]
    assert all(c["psnr_db"] >= 40 and c["finite"] for c in report["components"].values())


def test_programs_have_onnx_names_metadata_and_true_fp16(packages):
    from edit_mobile.runtime.mil import MILProgram

    manifest = json.loads((packages["sd3"] / "manifest.json").read_text())
    for comp, entry in manifest["components"].items():
        program = MILProgram(packages["sd3"] / entry["path"], comp)
        assert list(program.inputs) == [i["name"] for i in entry["inputs"]]
        assert program.output_names == [o["name"] for o in entry["outputs"]]
        assert program.compute_precision == "fp16"
        meta = program.metadata()
        assert meta["user_defined"]["edit_mobile.component"] == comp and "static shapes" in meta["short_description"]
        assert json.loads(meta["user_defined"]["edit_mobile.io"])["inputs"] == entry["inputs"]


@pytest.mark.parametrize("family,src", [("pixart", "tiny-pixart-edit-trained"), ("sd3", "tiny-sd3-mm-edit-trained")])
def test_fp32_transformer_matches_pytorch(tiny_dirs, tmp_path, family, src):
    """fp32 programs: converted, saved, reloaded, executed in numpy, at the fp32 gate (60 dB) of PyTorch."""
    from edit_mobile.export.components import pipeline_components
    from edit_mobile.export.coreml_export import coreml_parity, export_coreml
    from edit_mobile.models.convert import load_pipeline

    pipe = load_pipeline(str(tiny_dirs[src]))
    spec = next(s for s in pipeline_components(pipe, family, (256, 256), 2, 32) if s.name == "transformer")
    path = export_coreml(spec, tmp_path / "transformer", "fp32", "iOS18")
    report = coreml_parity(spec, path, "fp32")
    assert min(o["psnr_db"] for o in report["outputs"].values()) >= 60


def test_runtime_stays_torch_free():
    code = (
        "import sys; import edit_mobile.runtime.backends; import edit_mobile.runtime.mil.proto as p; "
        "p.proto_modules(); "
        "assert 'torch' not in sys.modules and 'coremltools' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_planted_fp16_overflow_is_reported_non_finite(tmp_path):
    """Linear attention with *sums* over 4096 tokens at input scale 10 overflows fp16; EDiT's means do not."""
    from edit_mobile.export.components import ComponentSpec, TensorSpec
    from edit_mobile.export.coreml_export import export_coreml
    from edit_mobile.models.edit_attention import relu_linear_attention
    from edit_mobile.runtime.metrics import compare
    from edit_mobile.runtime.mil import MILProgram

    class SumAttention(torch.nn.Module):  # unnormalised accumulation: S = sum_j k_j^T [v_j | 1]
        def forward(self, q, k, v):
            kv = torch.matmul(torch.relu(k).transpose(-1, -2), torch.cat([v, torch.ones_like(v[..., :1])], -1))
            out = torch.matmul(torch.relu(q), kv)
            return out[..., :-1] / (out[..., -1:] + 1e-6)

    class MeanAttention(torch.nn.Module):  # the EDiT kernel
        def forward(self, q, k, v):
            return relu_linear_attention(torch.relu(q), torch.relu(k), v, eps=1e-6)

    shape = (1, 1, 4096, 16)
    inputs = [TensorSpec(n, shape, "float32") for n in ("q", "k", "v")]
    feed = {n: (np.random.default_rng(i).standard_normal(shape) * 10).astype(np.float32) for i, n in enumerate("qkv")}
    results = {}
    for name, module in (("sum", SumAttention()), ("mean", MeanAttention())):
        spec = ComponentSpec(name, module, inputs, [TensorSpec("y", shape, "float32")])
        path = export_coreml(spec, tmp_path / name, "fp16", "iOS17")
        results[name] = MILProgram(path, name).run(feed)["y"]
    with torch.no_grad():  # fp32 PyTorch: both are finite there, the overflow is fp16's
        ref = {
            name: m(*[torch.from_numpy(feed[n]) for n in "qkv"]).numpy()
            for name, m in (("sum", SumAttention()), ("mean", MeanAttention()))
        }
    assert np.isfinite(ref["sum"]).all() and np.isfinite(ref["mean"]).all()
    planted = compare(ref["sum"], results["sum"])  # what validation records for a component
    assert planted["finite"] is False and planted["psnr_db"] < 0  # reported non-finite: fails every gate
    safe = compare(ref["mean"], results["mean"])
    assert safe["finite"] and safe["psnr_db"] >= 40


def test_export_refuses_a_non_finite_program(tmp_path, monkeypatch):
    """The export-time check fails (one line, UserError) when the program's output is not finite."""
    from edit_mobile.export import coreml_export
    from edit_mobile.export.components import ComponentSpec, TensorSpec

    class Overflow(torch.nn.Module):  # (250 x)^2 passes 65 504 for |x| > 1.03 (constants that fp16 holds)
        def forward(self, x):
            return (x * 250.0) * (x * 250.0)

    spec = ComponentSpec(
        "planted", Overflow(), [TensorSpec("x", (1, 8), "float32")], [TensorSpec("y", (1, 8), "float32")]
    )
    path = coreml_export.export_coreml(spec, tmp_path / "planted", "fp16", "iOS17")
    with pytest.raises(UserError, match="not finite in the reference executor"):
        coreml_export.coreml_parity(spec, path, "fp16")


@pytest.fixture(scope="module")
def int8_package(packages, tmp_path_factory):
    from edit_mobile.export.coreml_quantize import quantize_coreml_package

    out = tmp_path_factory.mktemp("int8") / "pixart-int8"
    quantize_coreml_package(packages["pixart"], out, "int8-weights")
    return out


def test_int8_weights_package_validates(int8_package, tmp_path):
    manifest = json.loads((int8_package / "manifest.json").read_text())
    assert manifest["components"]["transformer"]["precision"] == "int8-weights"
    q = manifest["components"]["transformer"]["quantization"]
    assert q["expansion_check"]["equal_to_coremltools_decompression"] and q["expansion_check"]["compressed_weights"]
    assert q["size_bytes"]["quantized"] < q["size_bytes"]["source"]
    report = _validate(int8_package, tmp_path)
    assert report["passed"], report["components"]
    assert report["components"]["transformer"]["gate_db"] == 35


@pytest.mark.parametrize("precision", ["palettize-6", "palettize-4", "w8a8"])
def test_compressed_package_through_validate(packages, tmp_path, precision):
    """Palettized and w8a8 packages go through `validate` like any other: each compressed component is held to its
    precision's gate, and the package's loop is checked with the fp32 PyTorch components."""
    from edit_mobile.export.coreml_quantize import quantize_coreml_package
    from edit_mobile.runtime.manifest import GATES_DB

    out = tmp_path / precision
    quantize_coreml_package(
        packages["pixart"],
        out,
        precision,
        components="transformer",
        calibration_prompts=["a red circle"],
        calibration_steps=1,
    )
    report = _validate(out, tmp_path)
    transformer = report["components"]["transformer"]
    assert transformer["precision"] == precision and transformer["gate_db"] == GATES_DB[precision]
    assert report["loop"]["passed"] and report["trajectory_gate"]["gate_db"] is None
    assert transformer["passed"] == (transformer["finite"] and transformer["psnr_db"] >= transformer["gate_db"])
    if precision != "w8a8":  # palettization passes on these weights (docs/coreml.md); w8a8's figure is reported there
        assert report["passed"], report["components"]


@pytest.fixture(scope="module")
def ios18_package(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml18") / "pixart"
    argv = ["export", str(tiny_dirs["tiny-pixart-edit-trained"]), "--target", "coreml", "--resolution", "256"]
    assert cli([*argv, "--compute-precision", "fp16", "--deployment-target", "iOS18", "--out", str(out)]) == 0
    return out


def test_int4_and_grouped_palettes_on_ios18(ios18_package, tmp_path):
    """iOS18 programs: int4 in blocks of 32 (constexpr_blockwise_shift_scale) and 4-bit palettes per group of 16
    output channels (per-block LUTs). The reference executor expands both exactly as coremltools' own decompression
    (`check_expansion` raises on any difference), and the int4 package passes its gate in `validate`."""
    from edit_mobile.export.coreml_quantize import quantize_coreml_package
    from edit_mobile.runtime.manifest import GATES_DB
    from edit_mobile.runtime.mil import MILProgram

    kinds = {"int4-weights": "constexpr_blockwise_shift_scale", "palettize-4": "constexpr_lut_to_dense"}
    for precision, op in kinds.items():
        out = tmp_path / precision
        manifest = quantize_coreml_package(ios18_package, out, precision, components="transformer")
        q = manifest["components"]["transformer"]["quantization"]
        assert q["expansion_check"]["equal_to_coremltools_decompression"] and q["expansion_check"]["compressed_weights"]
        program = MILProgram(out / "transformer" / "model.mlpackage")
        compressed = [o for o in program.ops if o.type == op]
        assert compressed
        if precision == "palettize-4":  # one table per 16 output channels: the LUT has a leading group axis > 1
            assert "16 output channels" in q["method"]
            luts = [
                [d.constant.size for d in o.inputs["lut"].arguments[0].value.type.tensorType.dimensions]
                for o in compressed
            ]  # (output channels / 16, 1, ..., 16 entries, vector size 1)
            assert all(shape[-2:] == [16, 1] and shape[0] > 1 for shape in luts), luts
        else:
            report = _validate(out, tmp_path)
            transformer = report["components"]["transformer"]
            assert transformer["gate_db"] == GATES_DB["int4-weights"] and report["passed"], transformer


def test_int4_needs_an_ios18_program(packages, tmp_path):
    from edit_mobile.export.coreml_quantize import quantize_coreml_package

    with pytest.raises(UserError, match="int4-weights needs a program for iOS18 / macOS15 or later"):
        quantize_coreml_package(packages["pixart"], tmp_path / "q", "int4-weights", components="transformer")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("precision", ["palettize-4", "palettize-6"])
def test_palettized_weights_expand_as_coremltools_decompresses(packages, tmp_path, precision):
    from edit_mobile.export.coreml_quantize import check_expansion, compress_program
    from edit_mobile.runtime.mil import MILProgram

    dst = tmp_path / "model.mlpackage"
    compress_program(packages["pixart"] / "transformer" / "model.mlpackage", dst, precision)
    program = MILProgram(dst)
    assert "constexpr_lut_to_dense" in program.op_types()
    assert check_expansion(dst)["compressed_weights"] > 0  # raises on any difference


def test_w8a8_quantize_ops_follow_coremltools(packages, tmp_path):
    """Activation quantization: the executor's quantize matches coremltools' own numpy quantizer."""
    from coremltools.optimize import _utils as ct_utils

    from edit_mobile.export.coreml_quantize import compress_program, record_inputs
    from edit_mobile.runtime.mil import MILProgram
    from edit_mobile.runtime.package import load_package

    package = load_package(packages["pixart"])
    samples = record_inputs(package, ["a red circle"], steps=1)["transformer"]
    dst = tmp_path / "model.mlpackage"
    compress_program(package.components["transformer"].path, dst, "w8a8", samples)
    program = MILProgram(dst)
    quantize_ops = [op for op in program.ops if op.type == "quantize"]
    assert quantize_ops and "dequantize" in program.op_types()
    values: dict = {}
    out = program.run(samples[0], observer=lambda n, v: values.__setitem__(n, v))
    assert np.isfinite(out["out_sample"]).all()
    constants = program.constants()
    for op in quantize_ops[:10]:
        arg = {k: v.arguments[0].name for k, v in op.inputs.items()}
        x = values[arg["input"]]
        zp = constants.get(arg.get("zero_point"))
        expected = ct_utils.quantize_by_scale_and_zp(x, constants[arg["scale"]], zp, "int8")
        np.testing.assert_array_equal(values[op.outputs[0].name], expected)


def _rehash(pkg: Path) -> None:
    manifest = json.loads((pkg / "manifest.json").read_text())
    for entry in manifest["components"].values():
        entry["files"] = {rel: hashlib.sha256((pkg / rel).read_bytes()).hexdigest() for rel in entry["files"]}
    (pkg / "manifest.json").write_text(json.dumps(manifest))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_corrupted_mlpackage_is_refused(packages, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(packages["pixart"], bad)
    model = bad / "transformer/model.mlpackage/Data/com.apple.CoreML/model.mlmodel"
    data = bytearray(model.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64
    model.write_bytes(bytes(data))
    argv = ["generate", str(bad), "--prompt", "x", "--backend", "coreml-reference", "--out", str(tmp_path / "x.png")]
    assert cli(argv) == 2
    assert "sha256 mismatch" in _one_line_error(capsys)
    _rehash(bad)  # a package whose manifest agrees with the damaged file: the parser must refuse it
    assert cli(argv) == 2
    assert "corrupted .mlpackage" in _one_line_error(capsys)
    assert not (tmp_path / "x.png").exists()


def test_unsupported_op_is_named(packages, tmp_path, capsys):
    from edit_mobile.export.components import ComponentSpec, TensorSpec
    from edit_mobile.export.coreml_export import export_coreml

    class Cumsum(torch.nn.Module):
        def forward(self, latent_sample):
            return torch.cumsum(latent_sample, 1)

    pkg = tmp_path / "pkg"
    shutil.copytree(packages["pixart"], pkg)
    shape = tuple(json.loads((pkg / "manifest.json").read_text())["components"]["vae_decoder"]["inputs"][0]["shape"])
    spec = ComponentSpec(
        "vae_decoder",
        Cumsum(),
        [TensorSpec("latent_sample", shape, "float32")],
        [TensorSpec("sample", shape, "float32")],
    )
    shutil.rmtree(pkg / "vae_decoder")
    export_coreml(spec, pkg / "vae_decoder", "fp32", "iOS17")
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["components"]["vae_decoder"]["files"] = {
        str(f.relative_to(pkg)): "0" * 64 for f in sorted((pkg / "vae_decoder").rglob("*")) if f.is_file()
    }
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    _rehash(pkg)
    capsys.readouterr()  # the conversion's progress bars
    assert (
        cli(["generate", str(pkg), "--prompt", "x", "--backend", "coreml-reference", "--out", str(tmp_path / "x.png")])
        == 2
    )
    assert "does not implement op 'cumsum' (in vae_decoder)" in _one_line_error(capsys)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--deployment-target", "iOS12"], "unknown --deployment-target 'iOS12'"),
        (["--compute-precision", "int4"], "unknown --compute-precision 'int4'"),
    ],
)
def test_export_bad_core_ml_options_write_nothing(tmp_path, capsys, argv, message):
    assert (
        cli(
            [
                "export",
                "tiny-pixart",
                "--target",
                "coreml",
                "--resolution",
                "256",
                *argv,
                "--out",
                str(tmp_path / "pkg"),
            ]
        )
        == 2
    )
    assert message in _one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_generate_on_linux_says_core_ml_needs_macos(packages, tmp_path, capsys):
    argv = [
        "generate",
        str(packages["pixart"]),
        "--prompt",
        "x",
        "--backend",
        "coreml",
        "--out",
        str(tmp_path / "x.png"),
    ]
    if sys.platform == "darwin":
        pytest.skip("Core ML is available here")
    assert cli(argv) == 2
    assert "Core ML prediction needs macOS; use --backend coreml-reference" in _one_line_error(capsys)


def test_reference_backend_generates_an_image(packages, tmp_path):
    assert (
        cli(
            [
                "generate",
                str(packages["pixart"]),
                "--prompt",
                "a red circle",
                "--steps",
                "2",
                "--backend",
                "coreml-reference",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "x.png").stat().st_size > 0


def test_ort_backend_refuses_a_core_ml_package(packages, tmp_path, capsys):
    argv = ["generate", str(packages["pixart"]), "--prompt", "x", "--backend", "ort", "--out", str(tmp_path / "x.png")]
    assert cli(argv) == 2
    error = _one_line_error(capsys)
    assert "the ort backend runs onnx / ort-mobile packages" in error and "use --backend coreml" in error


@pytest.mark.macos
@macos
def test_core_ml_prediction_matches_the_reference_executor(packages):
    """On macOS: Core ML itself (CPU only, deterministic) against the numpy reference executor."""
    from edit_mobile.runtime.coreml_backend import CoreMLBackend, CoreMLReferenceBackend
    from edit_mobile.runtime.metrics import psnr
    from edit_mobile.runtime.package import load_package

    package = load_package(packages["pixart"])
    comp = package.components["transformer"]
    rng = np.random.default_rng(0)
    feed = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in comp.inputs}
    real = CoreMLBackend(comp.path, comp.inputs, comp.output_names, compute_units="CPU_ONLY").run(feed)
    ref = CoreMLReferenceBackend(comp.path, comp.inputs, comp.output_names).run(feed)
    assert psnr(ref["out_sample"], real["out_sample"]) >= 40


def test_coremltools_log_level_is_restored_after_a_failure():
    """Library code changes no process-wide state: coremltools' logger is quiet only while a conversion runs."""
    import logging

    from edit_mobile.export.coreml_export import quiet_coremltools

    ct_logger = logging.getLogger("coremltools")
    before = ct_logger.level
    ct_logger.setLevel(logging.WARNING)
    try:
        with pytest.raises(RuntimeError), quiet_coremltools():
            assert ct_logger.level == logging.ERROR
            raise RuntimeError("conversion failed")
        assert ct_logger.level == logging.WARNING
    finally:
        ct_logger.setLevel(before)
