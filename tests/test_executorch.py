"""The ExecuTorch target (`export --target executorch`) and backend (`--backend executorch`): every component of the
tiny EDiT and MM-EDiT conversions as a `.pte` program lowered to XNNPACK, run by ExecuTorch's own runtime (the
kernels phones use) and validated against the diffusers pipeline with the same gates as the other targets."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from torch import nn

from edit_mobile.cli.main import main as cli
from edit_mobile.export.package import export_package
from edit_mobile.export.validate import ValidationOptions, validate
from edit_mobile.models.convert import load_pipeline
from edit_mobile.runtime.backends import component_backend
from edit_mobile.runtime.errors import UserError
from edit_mobile.runtime.package import load_package

MODELS = ("tiny-pixart-edit-trained", "tiny-sd3-mm-edit-trained")


@pytest.fixture(scope="module")
def packages(tiny_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("executorch")
    for name in MODELS:  # the PixArt package with a second size (test_sizes_are_methods_of_one_program)
        sizes = ["128", "96x160"] if name == MODELS[0] else "128"
        export_package(str(tiny_dirs[name]), root / name, target="executorch", resolution=sizes, max_text_tokens=32)
    return root


@pytest.mark.parametrize("name", MODELS)
def test_executorch_package_validates(packages, name):
    manifest = json.loads((packages / name / "manifest.json").read_text())
    assert manifest["target"] == "executorch"
    for component, entry in manifest["components"].items():
        assert entry["path"] == f"{component}/model.pte"
        record = manifest["export"][component]
        assert record["delegate"] == "xnnpack"
        # XNNPACK's fp32 GEMMs sum in another order than PyTorch's: within a few hundred float32 ulps of the output
        assert max(record["executorch_vs_torch_max_abs"].values()) < 2e-4
    report = validate(str(packages / name), opts=ValidationOptions(steps=2))
    assert report["passed"], report
    for size in report.get("sizes", {"": report}).values():  # each size of the two-size PixArt package
        assert size["components"]["transformer"]["psnr_db"] > 80


def test_transformer_work_is_delegated_to_xnnpack(packages):
    """Nearly all of the transformer's arithmetic (linear, conv, matmul) is inside XNNPACK delegate calls; the
    portable kernels keep only small operators (recorded by name in the manifest for `inspect`)."""
    for name in MODELS:
        manifest = json.loads((packages / name / "manifest.json").read_text())
        report = manifest["export"]["transformer"]["delegation"]
        # >= 99 %: the target; torch's own attention decomposition (its softmax guard) left 2.1 % of the
        # tiny MM-EDiT's FLOPs to the portable kernels (97.89 %) before export/executorch_export.py's own
        assert report["delegated_flop_fraction"] >= 0.99 and report["delegated_ops"] > 0
        assert not any(op in name for op in ("linear", "convolution", "bmm") for name in report["portable_ops"])
        # EDiT's own operators delegate: ConvFusion's normalisation through its twin (checked equal to it)
        assert not any(op.startswith("aten.var") for op in report["portable_ops"])
        twin = report["xnnpack_twin"]
        assert twin["kinds"]["ConvFusionXNNPACK"] > 0 and twin["kinds"]["LayerNormXNNPACK"] > 0
        assert twin["relative"] < 1e-4
        assert not any("layer_norm" in op for op in report["portable_ops"])


def test_inspect_reports_the_delegation(packages, capsys):
    assert cli(["inspect", str(packages / MODELS[0])]) == 0
    out = capsys.readouterr().out
    assert "transformer:" in out and "delegated to xnnpack" in out and "% of the FLOPs" in out


@pytest.mark.parametrize("precision", ["int8-dynamic", "int4-weights"])
def test_quantized_programs_pass_their_gates(tiny_dirs, tmp_path, capsys, precision):
    """Quantized at export (torchao for the linear layers, PT2E for the convolutions: XNNPACK's int8-dynamic-activation
    kernels): the quantized components carry their precision and gate, and the package validates against the fp32
    diffusers pipeline. The int8 package's
    transformer is also chunked: a program per chunk, run as one chain."""
    out = tmp_path / precision
    chunks = 2 if precision == "int8-dynamic" else None
    manifest = export_package(
        str(tiny_dirs[MODELS[0]]), out, target="executorch", resolution="128", max_text_tokens=32, precision=precision,
        transformer_chunks=chunks,
    )  # fmt: skip
    if chunks:
        paths = [c["path"] for c in manifest["components"]["transformer"]["chunks"]]
        assert paths == ["transformer/chunk-00/model.pte", "transformer/chunk-01/model.pte"]
        record = manifest["export"]["transformer"]
        assert (
            set(record["chunks"]) == {"chunk-00", "chunk-01"} and record["delegation"]["delegated_flop_fraction"] > 0.99
        )
    quantized = {n for n, e in manifest["components"].items() if e["precision"] == precision}
    assert quantized == ({"transformer", "text_encoder"} if precision == "int8-dynamic" else {"transformer"})
    # every dense convolution (ConvFusion's two per block, the patch embedding) int8, the depthwise compressors not
    transformer = load_pipeline(tiny_dirs[MODELS[0]]).transformer
    dense = sum(isinstance(m, nn.Conv2d) and m.groups == 1 for m in transformer.modules())
    record = manifest["export"]["transformer"]
    assert dense > 2 and record["delegation"]["int8_convolutions"] == dense  # of both chunks, for the int8 package
    if chunks:
        assert all(c["delegation"]["int8_convolutions"] > 0 for c in record["chunks"].values())
        assert cli(["inspect", str(out)]) == 0
        assert f"dense convolutions stored int8: {dense}" in capsys.readouterr().out
    report = validate(str(out), opts=ValidationOptions(steps=2))
    assert report["passed"], report
    assert report["components"]["transformer"]["gate_db"] == 25


def test_profile_accounts_for_the_call_on_both_runtimes(packages, tiny_dirs, tmp_path, monkeypatch):
    """scripts/profile_executorch.py: the profiled call's kernels, from ExecuTorch's ETDump and ONNX Runtime's
    session profile, fit in the call they were measured in (one call, not the warm-up too), and the GEMM kinds
    are found on both sides."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    from profile_executorch import profile_executorch, profile_onnxruntime

    name = MODELS[0]  # a two-size program: the default size's method is profiled
    onnx_pkg = tmp_path / "onnx"
    export_package(str(tiny_dirs[name]), onnx_pkg, resolution="128", max_text_tokens=32)
    for report in (profile_executorch(packages / name, 1), profile_onnxruntime(onnx_pkg, 1)):
        # at most the call (a tiny program's ETDump wrappers can take half of a 1 ms call: no lower bound)
        assert 0 < report["kernels_ms"] <= report["call_ms"]
        assert report["by_kind_ms"]["gemm"] > 0 and report["by_kind_ms"]["layout"] > 0
    assert any(k.startswith("Fully Connected") for k in profile_executorch(packages / name, 1)["top_kernels_ms"])


def test_wrong_backend_and_broken_program_are_one_line_errors(packages, tmp_path):
    package = load_package(packages / MODELS[0])
    with pytest.raises(UserError, match="use --backend executorch"):
        component_backend(package, "transformer", "ort")
    backend = component_backend(package, "vae_decoder")  # the target's own backend by default
    latent = np.zeros(package.input_specs("vae_decoder")[0].shape, np.float32)
    assert backend.run({"latent_sample": latent})["sample"].shape == (1, 3, 128, 128)
    broken = tmp_path / "model.pte"
    broken.write_bytes(b"not a program")
    from edit_mobile.runtime.executorch_backend import ExecuTorchBackend

    with pytest.raises(UserError, match="ExecuTorch cannot load this program"):
        ExecuTorchBackend(broken, package.input_specs("vae_decoder"), ["sample"])


def test_unknown_delegate_writes_nothing(tiny_dirs, tmp_path):
    with pytest.raises(UserError, match="unknown --delegate 'qnn'"):
        export_package(str(tiny_dirs[MODELS[0]]), tmp_path / "p", target="executorch", delegate="qnn")
    with pytest.raises(UserError, match="unknown ExecuTorch --precision 'int2'"):
        export_package(str(tiny_dirs[MODELS[0]]), tmp_path / "p", target="executorch", precision="int2")
    with pytest.raises(UserError, match="--delegate applies to --target executorch only"):
        export_package(str(tiny_dirs[MODELS[0]]), tmp_path / "p", delegate="xnnpack")
    assert not (tmp_path / "p").exists()


def test_sizes_are_methods_of_one_program(packages, tmp_path):
    """Several sizes: each size-dependent component is one .pte with a method per size (weights stored once), each
    method equal to its size's own program; generate picks the method of the size asked for."""
    out = packages / MODELS[0]
    manifest = json.loads((out / "manifest.json").read_text())
    merged = manifest["export"]["sizes"]["components"]
    assert set(merged) == {"transformer", "vae_decoder", "vae_encoder"}
    for name, record in merged.items():
        assert record["methods"] == ["image_128x128", "image_96x160"]
        assert all(diff == 0.0 for diff in record["max_abs_vs_own"].values())
        # the second size's method costs its graph and its size's constants, not a second copy of the weights
        # (transformer 408 KB for both sizes, 327 KB for one)
        assert record["bytes"] < 0.7 * record["bytes_before"], (name, record)
        assert sorted(p.name for p in (out / name).iterdir()) == ["model.pte"]
        assert manifest["sizes"]["96x160"]["components"][name]["function"] == "image_96x160"
    image = tmp_path / "x.png"
    argv = ["generate", str(out), "--size", "96x160", "--prompt", "a red circle", "--steps", "2", "--out", str(image)]
    assert cli(argv) == 0
    assert Image.open(image).size == (96, 160)


def test_core_ml_delegate_takes_every_component_and_its_programs_match_pytorch(tiny_dirs, tmp_path):
    """`--delegate coreml`: every component lowers whole to Core ML; ExecuTorch has no Core ML backend off Apple, so
    the export checks the programs the .pte embeds with the Core ML reference executor, and the ExecuTorch backend
    says in one line why it cannot run them here."""
    from executorch.extension.pybindings.portable_lib import _get_registered_backend_names

    out = tmp_path / "coreml"
    manifest = export_package(
        str(tiny_dirs[MODELS[0]]), out, target="executorch", resolution="128", max_text_tokens=32, delegate="coreml"
    )
    for name in manifest["components"]:
        record = manifest["export"][name]
        assert record["delegate"] == "coreml" and "executorch_vs_torch_max_abs" not in record
        d = record["delegation"]
        assert d["delegated_flop_fraction"] >= 0.99 and d["delegated_ops"] > 0
        check = d["coreml_reference_vs_torch"]
        assert check["partitions"] >= 1 and check["gate_db"] == 40
        # fp16 programs: 64-73 dB measured on the tiny components
        assert all(c["finite"] and c["psnr_db"] > 55 for c in check["outputs"].values()), (name, check)
    if "CoreMLBackend" not in _get_registered_backend_names():
        with pytest.raises(UserError, match=r"lowered to CoreMLBackend \(Apple devices only\)"):
            component_backend(load_package(out), "transformer")
    with pytest.raises(UserError, match="--delegate coreml exports fp32 weights"):
        export_package(str(tiny_dirs[MODELS[0]]), tmp_path / "q", target="executorch", delegate="coreml",
                       precision="int8-dynamic")  # fmt: skip
    assert not (tmp_path / "q").exists()


def test_core_ml_delegate_check_runs_the_embedded_programs(tiny_dirs, tmp_path, monkeypatch):
    """Plant an error in the Core ML programs' results (as a wrong conversion would make): the export's check sees
    it, so it runs the programs the .pte embeds and not the PyTorch partitions; nothing is written."""
    from edit_mobile.runtime.mil import MILProgram

    real_run = MILProgram.run
    monkeypatch.setattr(MILProgram, "run", lambda *a, **k: {n: v * 1.05 for n, v in real_run(*a, **k).items()})
    with pytest.raises(UserError, match=r"Core ML delegate\): output .* below the 40 dB fp16 gate"):
        export_package(str(tiny_dirs[MODELS[0]]), tmp_path / "p", target="executorch", resolution="128",
                       max_text_tokens=32, delegate="coreml")  # fmt: skip
    assert not (tmp_path / "p").exists()


def test_norm_twins_compute_the_reference_and_a_planted_error_is_refused(monkeypatch):
    """The XNNPACK twins (statistics as global average pooling) equal LayerNorm, diffusers' RMSNorm, T5's layer norm
    and GroupNorm to float32 rounding; a twin that forgets to centre is refused before any export, a quantized
    export's included (its twins are checked on the float module it was made from)."""
    import torch
    from diffusers.models.normalization import RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    from edit_mobile.export import executorch_twin as et
    from edit_mobile.export.executorch_export import quantized_module
    from edit_mobile.models.edit_attention import ConvFusion

    torch.manual_seed(0)
    x = torch.randn(2, 24, 64) * 3 + 1  # (B, N, D), off-centre so that a missing mean shows
    image = torch.randn(2, 32, 8, 8) * 3 + 1
    cases = [
        (torch.nn.LayerNorm(64), x),
        (torch.nn.LayerNorm(64, elementwise_affine=False, eps=1e-6), x),
        (RMSNorm(64, eps=1e-6), x),
        (T5LayerNorm(64), x),
        (torch.nn.GroupNorm(8, 32), image),
    ]
    for norm, value in cases:
        with torch.no_grad():
            for p in norm.parameters():
                p.copy_(torch.randn_like(p))
            twin, reference = et._twin_of(norm)(value), norm(value)
        scale = float(reference.abs().max())
        assert float((twin - reference).abs().max()) <= 1e-5 * scale, type(norm).__name__

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    with et.xnnpack_twin(model, (x,)) as report:
        assert report["kinds"] == {"LayerNormXNNPACK": 1} and isinstance(model[1], et.LayerNormXNNPACK)
    assert isinstance(model[1], torch.nn.LayerNorm)  # restored after the export
    # a quantized module's twins are checked on the float module it was made from, and swapped into it
    quantized = quantized_module(model, "int8-dynamic")
    with et.xnnpack_twin(quantized, (x,), checked_on=model) as report:
        assert isinstance(quantized[1], et.LayerNormXNNPACK) and report == et.check_xnnpack_twin(model, (x,))
    fusion = torch.nn.Sequential(ConvFusion(32, 4, 2))  # its GroupNorm is inside its own twin: one swap
    with et.xnnpack_twin(fusion, (image,)) as report:
        assert report["kinds"] == {"ConvFusionXNNPACK": 1}
    monkeypatch.setattr(et, "_mean_last", lambda t: torch.zeros_like(t[..., :1]))  # planted: no centring
    for module in (model, quantized):  # the float check guards the quantized export too
        with pytest.raises(RuntimeError, match="the module with its XNNPACK twins differs from the reference"):
            with et.xnnpack_twin(module, (x,), checked_on=model):
                pass
