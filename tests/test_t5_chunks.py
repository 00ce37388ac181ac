"""Chunked components: a T5 encoder exported as a chain of graphs (export/t5_chunks.py), one chunk in memory at a
time, run by the runtime as one component, quantized chunk by chunk; and the manifest's checks of a chain."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import T5Config, T5EncoderModel

from edit_mobile.cli.main import main as cli
from edit_mobile.export.t5_chunks import FolderParts, ModuleParts, block_bytes, plan_chunks, t5_chunk_specs
from edit_mobile.runtime.errors import UserError
from edit_mobile.runtime.package import load_package


@pytest.fixture(scope="module")
def t5():
    config = T5Config(
        vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_layers=5, num_heads=4, feed_forward_proj="gated-gelu"
    )
    torch.manual_seed(0)
    return T5EncoderModel(config).eval()


def _run_chain(builders, values: dict) -> dict:
    values = dict(values)
    for build in builders:
        spec = build()
        out = spec.module(*[values[s.name] for s in spec.inputs])
        values.update(zip([s.name for s in spec.outputs], out if isinstance(out, tuple) else (out,)))
    return values


@pytest.mark.parametrize("source", ["module", "sharded folder"])
def test_the_chain_computes_what_t5_computes(t5, tmp_path, source):
    """Block by block, from the in-memory model or from a sharded safetensors folder read tensor by tensor: the
    chain's output is T5EncoderModel's, bit for bit (the same ops in the same order), padding mask included."""
    if source == "module":
        parts = ModuleParts(t5)
    else:
        t5.save_pretrained(tmp_path, max_shard_size="20KB")  # several shards + model.safetensors.index.json
        assert (tmp_path / "model.safetensors.index.json").is_file()
        parts = FolderParts(tmp_path)
    ids = torch.randint(0, 120, (1, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(1, 9, dtype=torch.long)
    mask[0, 6:] = 0
    builders = t5_chunk_specs(parts, "text_encoder", 9, True, max_chunk_mb=0.05)
    assert len(builders) == 5  # one block per chunk at this budget
    with torch.no_grad():
        got = _run_chain(builders, {"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
        assert torch.equal(got, t5(ids, attention_mask=mask)[0])


def test_chunks_stay_within_the_budget(t5):
    per_block = block_bytes(t5.config)
    embed = 4 * t5.config.vocab_size * t5.config.d_model
    for mb in (0.05, 0.1, 0.2, 1.0):
        plan = plan_chunks(t5.config, mb)
        assert [i for r in plan for i in r] == list(range(5))
        sizes = [len(r) * per_block + (embed if k == 0 else 0) for k, r in enumerate(plan)]
        assert all(s <= mb * 2**20 or len(r) == 1 for s, r in zip(sizes, plan)), (mb, sizes)
    assert len(plan_chunks(t5.config, 1.0)) == 1


@pytest.fixture(scope="module")
def chunked(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("chunked") / "pkg"
    src = str(tiny_dirs["tiny-pixart-edit"])
    assert cli(["export", src, "--resolution", "128", "--max-component-mb", "0.05", "--out", str(out)]) == 0
    return out


def test_chunked_t5_exports_generates_and_validates(chunked, tiny_dirs, tmp_path):
    manifest = json.loads((chunked / "manifest.json").read_text())
    entry = manifest["components"]["text_encoder"]
    chunks = entry["chunks"]
    assert [c["path"] for c in chunks] == ["text_encoder/chunk-00/model.onnx", "text_encoder/chunk-01/model.onnx"]
    assert entry["path"] == chunks[0]["path"] and set(entry["files"]) == {c["path"] for c in chunks}
    assert [s["name"] for s in chunks[1]["inputs"]] == ["hidden_0", "position_bias", "attention_mask"]
    assert manifest["export"]["text_encoder"]["chunks"] == 2
    assert max(manifest["export"]["text_encoder"]["onnx_vs_torch_max_abs"].values()) < 1e-4
    report = tmp_path / "report.json"
    ref = str(tiny_dirs["tiny-pixart-edit"])
    assert cli(["validate", str(chunked), "--reference", ref, "--steps", "2", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["passed"] and result["components"]["text_encoder"]["psnr_db"] >= 60


def test_a_folders_large_t5_is_never_loaded_whole(tiny_dirs, tmp_path, monkeypatch):
    """From a pipeline folder, a T5 over the limit is skipped by the pipeline loader and read chunk by chunk."""
    from edit_mobile.export import package as package_module

    skipped = []
    real = package_module.load_pipeline
    monkeypatch.setattr(package_module, "load_pipeline", lambda src, skip=(): skipped.append(skip) or real(src, skip))
    out = tmp_path / "pkg"
    src = str(tiny_dirs["tiny-pixart-edit"])
    assert cli(["export", src, "--resolution", "128", "--max-component-mb", "0.05", "--out", str(out)]) == 0
    assert skipped == [("text_encoder",)]
    assert len(load_package(out).components["text_encoder"].chunk_paths) == 2


def test_chunked_component_quantizes_chunk_by_chunk(chunked, tiny_dirs, tmp_path):
    out = tmp_path / "int8"
    argv = ["quantize", str(chunked), "--precision", "int8-dynamic", "--components", "text_encoder"]
    assert cli([*argv, "--calibration-steps", "2", "--out", str(out)]) == 0
    q = json.loads((out / "manifest.json").read_text())["components"]["text_encoder"]["quantization"]
    assert set(q["chunks"]) == {"text_encoder.chunk-00", "text_encoder.chunk-01"}
    assert q["check"]["psnr_db"] >= 25 and q["size_bytes"]["quantized"] < q["size_bytes"]["fp32"]
    ref = str(tiny_dirs["tiny-pixart-edit"])
    assert cli(["validate", str(out), "--reference", ref, "--steps", "2"]) == 0


@pytest.mark.parametrize(
    "breakage,message",
    [
        (lambda c: c["chunks"][1]["inputs"][0].update(name="hidden_9"), "hidden_9 from the inputs or an earlier chunk"),
        (lambda c: c["chunks"][1].update(path="text_encoder/chunk-00/model.onnx"), "one distinct model file per chunk"),
        (lambda c: c["chunks"][1].update(path="text_encoder/chunk-01/other.onnx"), "a hash for chunk 1"),
        (lambda c: c.update(chunks=[]), "a non-empty list of chunks"),
        (lambda c: c["chunks"][-1]["outputs"][0].update(name="x"), "last_hidden_state produced by a chunk"),
    ],
)
def test_a_broken_chain_is_refused_in_one_line(chunked, tmp_path, capsys, breakage, message):
    pkg = tmp_path / "pkg"
    shutil.copytree(chunked, pkg)
    manifest = json.loads((pkg / "manifest.json").read_text())
    breakage(manifest["components"]["text_encoder"])
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=message):
        load_package(pkg)
    assert cli(["generate", str(pkg), "--prompt", "x", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and not (tmp_path / "x.png").exists()


def test_true_size_t5_writer_at_reduced_size(tiny_dirs, tmp_path):
    """models/t5_xxl.py writes T5-XXL's layout (here at the tiny pipeline's width and 3 blocks) one shard per block:
    transformers loads the folder, and a pipeline holding it exports chunk by chunk and validates."""
    from edit_mobile.models.t5_xxl import T5_XXL, write_random_t5

    src = tmp_path / "pipeline"
    shutil.copytree(tiny_dirs["tiny-pixart-edit"], src)
    shutil.rmtree(src / "text_encoder")
    small = {**T5_XXL, "vocab_size": 400, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 3, "num_heads": 4}
    write_random_t5(src / "text_encoder", small)
    index = json.loads((src / "text_encoder" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 + 2  # a shard per block, the embedding, the final norm
    model = T5EncoderModel.from_pretrained(src / "text_encoder")
    assert model.config.num_layers == 3 and model.encoder.block[0].layer[1].DenseReluDense.wi_0.weight.shape == (64, 32)
    out = tmp_path / "pkg"
    assert cli(["export", str(src), "--resolution", "128", "--max-component-mb", "0.05", "--out", str(out)]) == 0
    assert len(load_package(out).components["text_encoder"].chunk_paths) == 3
    assert cli(["validate", str(out), "--reference", str(src), "--steps", "2"]) == 0


def test_low_memory_mode_streams_a_chunked_text_encoder(chunked):
    """--memory low creates each T5 chunk's session when the chain reaches it and drops it after: one chunk in
    memory at a time; the image is the default mode's."""
    from edit_mobile.runtime.backends import ChainBackend, component_backend
    from edit_mobile.runtime.pipeline import Text2ImagePipeline

    package = load_package(chunked)
    streamed = component_backend(package, "text_encoder", stream_chunks=True)
    assert isinstance(streamed, ChainBackend) and all(callable(create) for create, _ in streamed.chunks)
    kept = component_backend(package, "text_encoder")
    assert not any(callable(backend) for backend, _ in kept.chunks)  # created up front, kept
    default_pipe, low_pipe = Text2ImagePipeline(package, progress=False), Text2ImagePipeline(package, memory="low")
    # low-memory mode also turns ONNX Runtime's CPU arena off (it keeps freed memory until the session ends)
    arena = {p.memory: p._create("vae_decoder").session.get_session_options().enable_cpu_mem_arena
             for p in (default_pipe, low_pipe)}  # fmt: skip
    assert arena == {"default": True, "low": False}
    default = default_pipe("a red circle", steps=2, seed=3)
    low = low_pipe("a red circle", steps=2, seed=3)
    assert (low.image == default.image).all()
