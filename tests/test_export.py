"""Export -> generate -> validate on the tiny presets (teacher and EDiT / MM-EDiT), graph checks, bad input."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from edit_mobile.cli.main import main as cli
from edit_mobile.export.inspect import inspect_package

# (package name, SRC key in tiny_dirs, target)
CASES = [
    ("pixart", "tiny-pixart", "onnx"),
    ("pixart-edit", "tiny-pixart-edit-trained", "ort-mobile"),
    ("sd3", "tiny-sd3", "onnx"),
    ("sd3-mm-edit", "tiny-sd3-mm-edit-trained", "onnx"),
]


@pytest.fixture(scope="module")
def packages(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("packages")
    out = {}
    for name, src, target in CASES:
        out[name] = root / name
        assert (
            cli(["export", str(tiny_dirs[src]), "--target", target, "--resolution", "256", "--out", str(out[name])])
            == 0
        )
    return out


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_export_generate_validate(packages, tmp_path, name):
    pkg = packages[name]
    assert (
        cli(["generate", str(pkg), "--prompt", "a red circle", "--steps", "4", "--out", str(tmp_path / "x.png")]) == 0
    )
    assert (tmp_path / "x.png").stat().st_size > 0
    report_path = tmp_path / "report.json"
    assert cli(["validate", str(pkg), "--steps", "4", "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["passed"] is True
    assert set(report["components"]) >= {"transformer", "vae_decoder", "text_encoder"}
    # The gates (60 dB) are set for real-size models; the tiny graphs match PyTorch to float noise (125-147 dB
    # here), so 100 dB still catches an export error far below the gate, on any CPU.
    assert all(c["psnr_db"] >= 100 for c in report["components"].values()), report["components"]
    assert len(report["trajectory"]) == 4 and report["trajectory_gate"]["min_psnr_db"] >= 100
    assert report["image"]["psnr_db"] >= 40 and report["loop"]["passed"]
    assert json.loads((pkg / "manifest.json").read_text())["validation"]["passed"] is True


def test_graphs_are_static_and_clean(packages):
    for name, pkg in packages.items():
        for comp, r in inspect_package(pkg).items():
            assert r["dynamic_io_dims"] == [] and r["fp64_tensors"] == [], (name, comp)
            assert r["intermediate_values_with_unknown_shape"] == 0, (name, comp)
            assert "If" not in r["ops"], (name, comp)


def test_ort_mobile_package_has_ort_files_and_operator_config(packages):
    pkg = packages["pixart-edit"]
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert all(c["path"].endswith(".ort") for c in manifest["components"].values())
    config = (pkg / "required_operators.config").read_text()
    assert "ai.onnx;17;" in config and "Conv" in config


def test_manifest_records_shapes_hashes_and_tools(packages, tiny_dirs):
    manifest = json.loads((packages["sd3-mm-edit"] / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["architecture"] == "MMEDiTSD3Transformer2DModel"
    assert manifest["resolution"] == [256, 256] and manifest["latent_shape"] == [16, 32, 32]
    spec = {i["name"]: i["shape"] for i in manifest["components"]["transformer"]["inputs"]}
    assert spec["sample"] == [2, 16, 32, 32] and spec["encoder_hidden_states"] == [2, 77 + 256, 64]
    assert all(len(h) == 64 for c in manifest["components"].values() for h in c["files"].values())
    assert manifest["tools"]["onnx"] and manifest["tools"]["torch"]
    # the fused graph (default): MM-EDiT's two softmax terms per block as MHA, one in the last block (its prompt
    # stream ends there); the 100 dB validation above is its parity check
    config = tiny_dirs["tiny-sd3-mm-edit-trained"] / "transformer" / "config.json"
    layers = json.loads(config.read_text())["num_layers"]
    assert manifest["export"]["transformer"]["fused_ops"]["MultiHeadAttention"] == 2 * layers - 1


def test_model_over_2gb_limit_uses_external_data(tmp_path, monkeypatch):
    """The external-data path, exercised on a tiny model by lowering the threshold."""
    import edit_mobile.export.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    assert cli(["export", "tiny-pixart", "--resolution", "256", "--out", str(tmp_path / "p")]) == 0
    files = sorted(p.name for p in (tmp_path / "p" / "transformer").iterdir())
    assert files == ["model.onnx", "model.onnx.data"]
    model = onnx.load(str(tmp_path / "p" / "transformer" / "model.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert cli(["validate", str(tmp_path / "p"), "--steps", "2"]) == 0


def _corrupt(pkg, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(pkg, bad)
    path = bad / "transformer" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize("command", ["generate", "validate"])
def test_one_changed_byte_is_refused(packages, tmp_path, capsys, command):
    bad = _corrupt(packages["pixart"], tmp_path)
    extra = ["--prompt", "x", "--out", str(tmp_path / "x.png")] if command == "generate" else []
    assert cli([command, str(bad), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "sha256 mismatch for transformer/model.onnx" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv,message",
    [
        (["export", "tiny-pixart", "--resolution", "250"], "both sides must be multiples of 16"),
        (["export", "tiny-pixart", "--resolution", "big"], "an image size must be N or WIDTHxHEIGHT"),
        (["export", "no-such-model", "--resolution", "256"], "neither a preset"),
        (
            ["export", "tiny-pixart", "--resolution", "256", "--compute-precision", "fp32"],
            "--compute-precision applies to --target coreml only (ONNX packages get fp16",
        ),
        (
            ["export", "tiny-pixart", "--target", "ort-mobile", "--resolution", "256", "--deployment-target", "iOS18"],
            "--deployment-target applies to --target coreml only",
        ),
    ],
)
def test_export_bad_input_writes_nothing(tmp_path, capsys, argv, message):
    assert cli([*argv, "--out", str(tmp_path / "pkg")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "{pkg}", "--prompt", "x", "--backend", "tpu", "--out", "{tmp}/x.png"], "unknown backend"),
        (
            ["generate", "{pkg}", "--prompt", "x", "--size", "512x128", "--out", "{tmp}/x.png"],
            "512x128 bins to 512x128 (PixArt-Σ's aspect-ratio buckets, as diffusers bins sizes), which the package "
            "lacks; it has 256x256",
        ),
        (["generate", "{tmp}", "--prompt", "x", "--out", "{tmp}/x.png"], "manifest.json"),
        (["validate", "{pkg}", "--reference", "tiny-sd3"], "is a sd3 pipeline"),
    ],
)
def test_runtime_bad_input(packages, tmp_path, capsys, argv, message):
    argv = [a.format(pkg=packages["pixart"], tmp=tmp_path) for a in argv]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


# --- export targets: one registry, one loop ----------------------------------------------------------------------
def test_export_targets_are_the_manifest_targets():
    import inspect

    from edit_mobile.export import package
    from edit_mobile.export.targets import EXPORT_TARGETS, export_target
    from edit_mobile.runtime.errors import UserError
    from edit_mobile.runtime.manifest import TARGETS

    assert tuple(EXPORT_TARGETS) == TARGETS
    assert export_target("coreml").resolve_options() == {"compute_precision": "fp16", "deployment_target": "iOS17"}
    assert export_target("coreml").resolve_options(compute_precision="fp32") == {
        "compute_precision": "fp32",
        "deployment_target": "iOS17",
    }
    assert export_target("onnx").resolve_options(compute_precision=None, deployment_target=None) == {"graph": "fused"}
    with pytest.raises(UserError, match=r"unknown --target 'tflite'; expected one of onnx, ort-mobile, coreml"):
        export_target("tflite")
    source = inspect.getsource(package.export_package)
    assert "target ==" not in source and 'target != "' not in source  # no per-target branch in the export loop


def test_export_summaries(packages):
    from edit_mobile.export.targets import export_target

    manifest = json.loads((packages["pixart"] / "manifest.json").read_text())
    line = export_target(manifest["target"]).summary(manifest, "PKG")
    assert line.startswith("wrote PKG: 4 components at 256x256, max |ONNX - PyTorch| on random inputs ")


def _tiny_transformer_spec(model, inputs):
    from edit_mobile.export.components import ComponentSpec, PixArtTransformer, TensorSpec

    return ComponentSpec(
        "transformer",
        PixArtTransformer(model),
        [TensorSpec(k, v.shape, "float32") for k, v in inputs.items()],
        [TensorSpec("out_sample", (1, 8, 8, 8), "float32")],
    )


def test_fused_export_matches_pytorch(tmp_path, monkeypatch):
    """`export --graph fused` (the default): the softmax teacher with every attention as ONNX Runtime's fused
    MultiHeadAttention and an EDiT with its prompt cross-attention as MHA match PyTorch on a prompt mask that hides
    tokens; the processors are diffusers' own again afterwards. Planted: an MHA that ignores the mask fails."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    from edit_mobile.export import mha
    from edit_mobile.models.edit_attention import EDiTAttnProcessor
    from edit_mobile.models.edit_pixart import EDiTPixArtTransformer2DModel
    from edit_mobile.models.presets import PRESETS

    teacher = PRESETS["tiny-pixart"].build().transformer
    student = EDiTPixArtTransformer2DModel.from_teacher(teacher).eval()
    inputs = _tiny_pixart_inputs(teacher)

    def export_and_compare(name, model):
        return _fused_export_error(tmp_path / name, model, inputs)

    blocks = len(teacher.transformer_blocks)
    for name, model, mha_nodes in (("softmax", teacher, 2 * blocks), ("edit", student, blocks)):
        ops, err = export_and_compare(name, model)
        assert ops["MultiHeadAttention"] == mha_nodes and ops["FastGelu"] >= blocks, (name, ops)
        assert err < 1e-5, (name, err)
    assert all(type(b.attn1.processor) is AttnProcessor2_0 for b in teacher.transformer_blocks)
    assert all(isinstance(b.attn1.processor, EDiTAttnProcessor) for b in student.transformer_blocks)

    original = mha.MHAExportProcessor.__call__

    def ignore_mask(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        keep_all = None if attention_mask is None else attention_mask * 0.0  # every prompt token attended
        return original(self, attn, hidden_states, encoder_hidden_states, keep_all, **kw)

    monkeypatch.setattr(mha.MHAExportProcessor, "__call__", ignore_mask)
    _, err = export_and_compare("planted", student)
    assert err > 1e-2, err


def _tiny_pixart_inputs(teacher):
    """Transformer inputs of tiny-pixart with a prompt mask that hides 5 of 8 tokens."""
    import numpy as np

    rng = np.random.default_rng(0)
    mask = np.zeros((1, 8), np.float32)
    mask[:, :3] = 1.0
    return {
        "sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
        "timestep": np.full((1,), 500.0, np.float32),
        "encoder_hidden_states": rng.standard_normal((1, 8, teacher.config.caption_channels)).astype(np.float32),
        "encoder_attention_mask": mask,
    }


def _fused_export_error(out, model, inputs):
    """Export `model` as the fused graph; its fused-op counts and max |ONNX Runtime - PyTorch| / max |PyTorch|."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from edit_mobile.export.onnx_export import export_onnx
    from edit_mobile.export.targets import fused_ops

    spec = _tiny_transformer_spec(model, inputs)
    path = export_onnx(spec, out, fused=True)
    with torch.inference_mode():
        ref = spec.module(*(torch.from_numpy(v) for v in inputs.values())).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
    # in units of the output's fp32 precision: float reordering only (measured ~2e-7 relative)
    return fused_ops([path])["fused_ops"], float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("convfusion", ["separable", "off"])
def test_convfusion_variants_export_as_in_pytorch(tmp_path, convfusion):
    """The depthwise-separable ConvFusion and EDiT without ConvFusion export and match PyTorch like the default
    (their new layers random, so that ConvFusion's output is not the fresh conversion's zero)."""
    import torch

    from edit_mobile.models.edit_attention import EDiTConfig
    from edit_mobile.models.edit_pixart import EDiTPixArtTransformer2DModel
    from edit_mobile.models.presets import PRESETS

    teacher = PRESETS["tiny-pixart"].build().transformer
    student = EDiTPixArtTransformer2DModel.from_teacher(teacher, EDiTConfig(convfusion=convfusion)).eval()
    new = {k: v for k, v in student.named_parameters() if "conv_fusion" in k}
    assert bool(new) == (convfusion != "off")
    with torch.no_grad():
        for v in new.values():
            v.copy_(torch.randn_like(v) * 0.2)
    _, err = _fused_export_error(tmp_path / convfusion, student, _tiny_pixart_inputs(teacher))
    assert err < 1e-5, err


def test_export_graph_option(tmp_path, capsys):
    """--graph fused (default) / plain: recorded in the manifest, plain has standard ONNX ops only; a bad value or
    another target's use is refused in one line, nothing written."""
    for graph in ("fused", "plain"):
        out = tmp_path / graph
        argv = ["export", "tiny-pixart", "--resolution", "128", "--out", str(out)]
        assert cli(argv + (["--graph", "plain"] if graph == "plain" else [])) == 0
        record = json.loads((out / "manifest.json").read_text())["export"]
        domains = {n.domain for n in onnx.load(str(out / "transformer" / "model.onnx")).graph.node}
        if graph == "fused":
            assert record["transformer"]["fused_ops"]["MultiHeadAttention"] == 4, record["transformer"]
            assert "com.microsoft" in domains
        else:
            assert "fused_ops" not in record["transformer"] and domains == {""}
        assert all("fused_ops" not in record[c] for c in ("text_encoder", "vae_decoder", "vae_encoder"))
    capsys.readouterr()
    for argv, message in (
        (["--graph", "flash"], "--graph 'flash': choose one of fused, plain"),
        (["--graph", "plain", "--target", "coreml"], "--graph applies to --target onnx, ort-mobile only"),
    ):
        out = tmp_path / "bad"
        assert cli(["export", "tiny-pixart", "--resolution", "128", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_shorter_prompt_length_is_exact_under_the_mask(tmp_path):
    """`export --max-text-tokens` shorter than the pipeline's (PixArt-Σ pads to 300 T5 tokens): a prompt that fits
    gives the same image, because T5 and the transformer's prompt attention (fused MHA's key padding mask) both
    ignore padded tokens. What `--max-text-tokens 120` relies on (docs/benchmarks.md)."""
    from edit_mobile.runtime.metrics import psnr
    from edit_mobile.runtime.pipeline import Text2ImagePipeline

    images = {}
    for tokens in (None, 12):
        out = tmp_path / f"t{tokens}"
        extra = ["--max-text-tokens", str(tokens)] if tokens else []
        assert cli(["export", "tiny-pixart", "--resolution", "128", *extra, "--out", str(out)]) == 0
        pipe = Text2ImagePipeline(out, progress=False)
        images[tokens] = pipe("a red circle", steps=3, seed=3, decode=False).latents[-1]
        lengths = {t.max_length for t in pipe.package.text.values()}
        assert lengths == ({12} if tokens else lengths - {12}), lengths
    # the same final latents up to float summation order; one masked token attended moves them by far more
    assert psnr(images[None], images[12]) >= 80
