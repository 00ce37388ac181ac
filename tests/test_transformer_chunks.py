"""A transformer exported as a chain of graphs split at block boundaries (models/transformer_chunks.py,
`export --transformer-chunks K` / `--max-component-mb N`): the chain computes what the whole model computes, the
package runs, validates and quantizes like an unchunked one, and a bad chunk count is refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

from edit_mobile.cli.main import main as cli
from edit_mobile.export.components import TensorSpec, transformer_component
from edit_mobile.models.edit_attention import EDiTConfig
from edit_mobile.models.families import torch_family
from edit_mobile.models.transformer_chunks import block_bytes, plan_blocks
from edit_mobile.runtime.backends import component_backend
from edit_mobile.runtime.package import load_package


def _pixart(edit: bool):
    torch.manual_seed(0)
    t = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4, sample_size=8,
        patch_size=2, caption_channels=24, cross_attention_dim=32, norm_type="ada_norm_single",
        interpolation_scale=1,
    )  # fmt: skip
    return torch_family("pixart").student.from_teacher(t, EDiTConfig()) if edit else t


def _sd3(edit: bool):
    torch.manual_seed(0)
    t = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20,
        pos_embed_max_size=16, dual_attention_layers=(0,),
    )  # fmt: skip
    return torch_family("sd3").student.from_teacher(t, EDiTConfig()) if edit else t


def _inputs(family: str, batch: int = 2) -> tuple[list[TensorSpec], list[torch.Tensor]]:
    specs = [TensorSpec("sample", (batch, 4, 16, 12), "float32"), TensorSpec("timestep", (batch,), "float32")]
    if family == "pixart":
        specs += [TensorSpec("encoder_hidden_states", (batch, 7, 24), "float32")]
        specs += [TensorSpec("encoder_attention_mask", (batch, 7), "int64")]
    else:
        specs += [TensorSpec("encoder_hidden_states", (batch, 7, 24), "float32")]
        specs += [TensorSpec("pooled_projections", (batch, 20), "float32")]
    gen = torch.Generator().manual_seed(1)
    values = [s.example(gen) for s in specs]
    values[1] = torch.tensor([999.0, 3.0][:batch])
    if family == "pixart":
        values[3] = torch.tensor([[1] * 7, [1] * 4 + [0] * 3][:batch])  # the second prompt padded
    return specs, values


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_position_embedding_is_stored_as_a_row_and_a_column_part(family):
    """The exported patch embedding keeps (h + w)·D position numbers instead of h·w·D (the only weights that differ
    between the sizes of a multi-size package) and computes diffusers' `PatchEmbed` bit for bit, at a non-square
    size other than the model's own (PixArt interpolates its embedding there, SD3 crops its table); an embedding
    that is not separable keeps diffusers' module."""
    from edit_mobile.models.transformer_chunks import SeparablePositions

    embed = (_pixart if family == "pixart" else _sd3)(False).pos_embed
    latent = torch.randn(2, 4, 16, 12)
    twin = SeparablePositions.wrap(embed, (16, 12))
    assert isinstance(twin, SeparablePositions) and twin.rows.shape == (8, 1, 32) and twin.columns.shape == (1, 6, 32)
    with torch.no_grad():
        assert torch.equal(twin(latent), embed(latent))
        embed.pos_embed.copy_(torch.randn_like(embed.pos_embed))  # planted: not a sin-cos table
    assert SeparablePositions.wrap(embed, (8, 8) if family == "pixart" else (16, 12)) is embed  # PixArt: its own size


@pytest.mark.parametrize("chunks", [None, 3])
@pytest.mark.parametrize("family,edit", [("pixart", False), ("pixart", True), ("sd3", False), ("sd3", True)])
def test_the_chain_computes_what_the_transformer_computes(family, edit, chunks):
    """Teacher and EDiT / MM-EDiT student (random ConvFusion and compressor weights, so the grid they need
    matters), 4 blocks as the one graph an unchunked export traces, or in 3 chunks (a first, a middle and a last
    one), on a non-square latent: equal to the diffusers forward bit for bit."""
    transformer = (_pixart if family == "pixart" else _sd3)(edit).eval()
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if any(n in name for n in ("conv_fusion", "k_compressor", "v_compressor")):
                p.add_(torch.randn_like(p) * 0.1)
    out_channels = transformer.config.out_channels
    specs, values = _inputs(family)
    outputs = [TensorSpec("out_sample", (2, out_channels, 16, 12), "float32")]
    torch_spec = torch_family(family)
    component = transformer_component(transformer, torch_spec, specs, outputs, chunks=chunks)
    assert (component.module is None) == (chunks is not None) and len(component.chunks) == (chunks or 0)
    chain = dict(zip((s.name for s in specs), values))
    with torch.no_grad():
        for build in component.chunks or [lambda: component]:
            chunk = build()
            for s in chunk.inputs:  # every input a component input or an earlier output, at its declared shape
                assert tuple(chain[s.name].shape) == s.shape, (chunk.name, s.name)
            out = chunk.module(*(chain[s.name] for s in chunk.inputs))
            out = (out,) if isinstance(out, torch.Tensor) else out  # the one graph returns the sample itself
            chain.update(zip((s.name for s in chunk.outputs), out))
            assert all(tuple(chain[s.name].shape) == s.shape for s in chunk.outputs), chunk.name
        whole = torch_spec.reference_transformer(transformer)(*values)
    assert torch.equal(chain["out_sample"], whole)


def test_plans_split_at_block_boundaries():
    transformer = _pixart(edit=False)
    assert plan_blocks(transformer, chunks=2) == [range(0, 2), range(2, 4)]
    assert plan_blocks(transformer, chunks=3) == [range(0, 1), range(1, 3), range(3, 4)]
    per_block = block_bytes(transformer)[0]
    rest = 4 * sum(p.numel() for p in transformer.parameters()) - 4 * per_block
    for blocks in (1, 2, 3):  # a budget of `blocks` blocks (+ the embeddings and head in the first chunk)
        plan = plan_blocks(transformer, max_chunk_mb=(rest + blocks * per_block) / 2**20)
        assert [len(r) for r in plan][0] == blocks and [i for r in plan for i in r] == list(range(4))
    assert len(plan_blocks(transformer, max_chunk_mb=1000)) == 1  # fits: one graph
    with pytest.raises(ValueError, match="2..4"):
        plan_blocks(transformer, chunks=5)


@pytest.fixture(scope="module")
def chunked(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("transformer-chunks") / "pkg"
    src = str(tiny_dirs["tiny-sd3-mm-edit-trained"])
    assert cli(["export", src, "--resolution", "128", "--transformer-chunks", "2", "--out", str(out)]) == 0
    return out


def test_chunked_transformer_exports_validates_and_quantizes(chunked, tiny_dirs, tmp_path):
    manifest = json.loads((chunked / "manifest.json").read_text())
    chunks = manifest["components"]["transformer"]["chunks"]
    assert [[s["name"] for s in c["inputs"]] for c in chunks][1] == ["hidden_0", "context_0", "temb"]
    assert max(manifest["export"]["transformer"]["onnx_vs_torch_max_abs"].values()) < 1e-4
    assert "chunks" not in manifest["components"]["text_encoder"]  # --transformer-chunks chunks the transformer only
    ref = str(tiny_dirs["tiny-sd3-mm-edit-trained"])
    report = tmp_path / "report.json"
    assert cli(["validate", str(chunked), "--reference", ref, "--steps", "2", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["components"]["transformer"]["psnr_db"] >= 60
    out = tmp_path / "int8"
    argv = ["quantize", str(chunked), "--precision", "int8-dynamic", "--components", "transformer"]
    assert cli([*argv, "--calibration-steps", "2", "--out", str(out)]) == 0
    q = load_package(out).components["transformer"].entry.quantization
    assert set(q["chunks"]) == {"transformer.chunk-00", "transformer.chunk-01"} and q["check"]["psnr_db"] >= 25
    assert cli(["validate", str(out), "--reference", ref, "--steps", "2"]) == 0


@pytest.mark.parametrize("chunks", ["1", "3"])
def test_a_bad_chunk_count_is_refused_in_one_line(tiny_dirs, tmp_path, capsys, chunks):
    out = tmp_path / "pkg"
    argv = ["export", str(tiny_dirs["tiny-pixart"]), "--resolution", "128", "--transformer-chunks", chunks]
    assert cli([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()  # after the pipeline loader's progress bars: one line
    assert err.splitlines()[-1].startswith("edit-mobile export: error: --transformer-chunks: chunks must be in 2..2")
    assert "Traceback" not in err and not out.exists()


def test_core_ml_chunks_are_programs_per_chunk_and_size(tiny_dirs, tmp_path):
    """Core ML gets the same chunking (apple/ml-stable-diffusion's --chunk-unet): one ML program per chunk; at two
    sizes on iOS18 each chunk's programs merge into one multi-function program. The chain validates at both sizes
    through the reference executor, and compressing it compresses each chunk on its own inputs along the chain."""
    from edit_mobile.export.coreml_quantize import quantize_coreml_package
    from edit_mobile.export.package import export_package
    from edit_mobile.export.validate import ValidationOptions, validate

    src, out, q = str(tiny_dirs["tiny-pixart-edit-trained"]), tmp_path / "coreml", tmp_path / "int8"
    export_package(src, out, target="coreml", resolution=["128", "96x160"], max_text_tokens=32,
                   transformer_chunks=2, deployment_target="iOS18")  # fmt: skip
    package = load_package(out)
    for key in package.sizes:
        entry = package.at_size(key).components["transformer"].entry
        assert entry.model_paths == ["transformer/chunk-00/model.mlpackage", "transformer/chunk-01/model.mlpackage"]
        assert entry.function == f"image_{key}"
    assert sorted(p.name for p in (out / "transformer").iterdir()) == ["chunk-00", "chunk-01"]  # sizes merged
    parity = package.manifest.export["transformer"]["coreml_reference_vs_torch"]["outputs"]
    assert {k.split(".")[0] for k in parity} == {"chunk-00", "chunk-01"}
    report = validate(str(out), opts=ValidationOptions(steps=2))
    assert report["passed"] and list(report["sizes"]) == ["128x128", "96x160"]
    for size_report in report["sizes"].values():
        assert size_report["components"]["transformer"]["psnr_db"] >= 40  # the fp16 chain against PyTorch
    # the chain computes exactly what the unchunked program computes (fp16 values cross the cut losslessly)
    whole = tmp_path / "whole"
    export_package(src, whole, target="coreml", resolution="128", max_text_tokens=32, deployment_target="iOS18")
    rng = np.random.default_rng(0)
    feed = {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in package.components["transformer"].inputs}
    feed.update(timestep=np.full(2, 500.0, np.float32), encoder_attention_mask=np.ones((2, 32), np.float32))
    chained = component_backend(package, "transformer", "coreml-reference").run(feed)["out_sample"]
    one = component_backend(load_package(whole), "transformer", "coreml-reference").run(feed)["out_sample"]
    np.testing.assert_array_equal(chained, one)

    quantize_coreml_package(out, q, "int8-weights", components="transformer")
    entry = load_package(q).components["transformer"].entry
    assert set(entry.quantization["chunks"]) == {"chunk-00", "chunk-01"}
    assert entry.quantization["check"]["psnr_db"] >= 30
    for rel in entry.model_paths:  # each chunk's weights (both sizes' functions share them): int8, not fp16
        (fp16,), (int8,) = (out / rel).rglob("weight.bin"), (q / rel).rglob("weight.bin")
        assert int8.stat().st_size < 0.65 * fp16.stat().st_size
    report = validate(str(q), opts=ValidationOptions(steps=2))
    assert report["passed"] and list(report["sizes"]) == ["128x128", "96x160"]
