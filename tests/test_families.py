"""The family registry (runtime/families.py, models/families.py) and the trajectory recorder (runtime/trajectory.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from edit_mobile.runtime.families import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = {"runtime/families.py", "models/families.py"}
# Files that still name a family outside the registry, and why. Anything else that does fails the test below.
NAMED_ELSEWHERE = {
    "models/presets.py": "each preset names the family of the model it builds",
}


def _family_literals(path: Path) -> list[int]:
    """Lines of `path` where a family name appears as a whole string literal (a table key, a comparison)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in FAMILIES
    ]


def test_the_registry_is_the_only_family_table():
    found = {}
    for folder in ("runtime", "export", "models", "cli"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in REGISTRY or rel in NAMED_ELSEWHERE:
                continue
            lines = _family_literals(path)
            if lines:
                found[rel] = lines
    assert not found, f"family names outside the registry (ask runtime/families.py or models/families.py): {found}"
    for rel in REGISTRY:
        assert _family_literals(ROOT / rel), rel


def test_both_halves_name_the_same_families():
    from edit_mobile.models.convert import ARCHS, SUPPORTED_PIPELINES
    from edit_mobile.models.families import TORCH_FAMILIES
    from edit_mobile.runtime.manifest import FAMILIES as MANIFEST_FAMILIES

    assert list(TORCH_FAMILIES) == list(FAMILIES) == list(MANIFEST_FAMILIES)
    for name, entry in TORCH_FAMILIES.items():
        assert entry.spec is FAMILIES[name] and entry.name == name
        assert ARCHS[entry.arch] is entry and all(SUPPORTED_PIPELINES[p] == name for p in entry.pipelines)
        spec = FAMILIES[name]
        assert spec.prompt_encoder in spec.text_encoders and spec.default_text_tokens > 0
        assert len({e.component for e in spec.text_encoders}) == len(spec.text_encoders)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_specs_take_what_the_runtime_builds(name):
    """Every registered family has a tiny preset; its exported text encoders' outputs, combined by the family's
    runtime rule, have exactly the transformer graph's conditioning shapes, and the transformer runs on them."""
    import torch

    from edit_mobile.export.components import pipeline_components
    from edit_mobile.models.presets import PRESETS
    from edit_mobile.runtime.tokenizer import Encoding

    family = FAMILIES[name]
    pipe = PRESETS[f"tiny-{name}"].build()
    specs = {s.name: s for s in pipeline_components(pipe, name, (64, 64), 2, 16)}
    encoders = [e.component for e in family.text_encoders]
    assert list(specs) == [*encoders, "transformer", "vae_decoder", "vae_encoder"]
    assert specs[family.prompt_encoder.component].inputs[0].shape == (1, 16)
    transformer = specs["transformer"]
    assert [s.name for s in transformer.inputs] == ["sample", "timestep", *family.conditioning]

    encoded = {}
    for enc in family.text_encoders:
        spec = specs[enc.component]
        assert [s.name for s in spec.inputs] == list(enc.inputs)
        assert spec.extra == {"tokenizer": enc.tokenizer, "max_length": spec.inputs[0].shape[1]}
        ids = torch.randint(0, 50, spec.inputs[0].shape, generator=torch.Generator().manual_seed(0))
        args = [ids if s.name == "input_ids" else torch.ones_like(ids) for s in spec.inputs]
        with torch.inference_mode():
            out = spec.module(*args)
        out = [out] if torch.is_tensor(out) else list(out)
        assert [tuple(t.shape) for t in out] == [s.shape for s in spec.outputs]
        encoded[enc.component] = (
            Encoding(ids.numpy(), np.ones_like(ids.numpy())),
            {s.name: t.numpy() for s, t in zip(spec.outputs, out)},
        )
    cond = family.combine(encoded)
    for s in transformer.inputs[2:]:
        assert (s.shape[0], *cond[s.name].shape[1:]) == s.shape, s
    feed = [torch.zeros(s.shape) for s in transformer.inputs[:2]]
    feed += [torch.from_numpy(np.concatenate([cond[s.name]] * 2)) for s in transformer.inputs[2:]]
    with torch.inference_mode():
        assert tuple(transformer.module(*feed).shape) == transformer.outputs[0].shape


# --- the trajectory recorder ----------------------------------------------------------------------------------------
class Recording:
    """A backend that keeps a copy of every input feed it runs."""

    def __init__(self, backend):
        self.backend, self.seen = backend, []

    def run(self, inputs):
        self.seen.append({k: np.array(v) for k, v in inputs.items()})
        return self.backend.run(inputs)


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    from edit_mobile.cli.main import main as cli

    root, out = tmp_path_factory.mktemp("family-packages"), {}
    for name, batch in zip(FAMILIES, ("2", "1", "2", "1")):
        out[name] = root / name
        argv = ["export", f"tiny-{name}", "--resolution", "64", "--batch", batch, "--max-text-tokens", "16"]
        assert cli([*argv, "--out", str(out[name])]) == 0
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_recorder_keeps_what_every_component_was_fed(packages, name):
    from edit_mobile.runtime.backends import component_backend
    from edit_mobile.runtime.package import load_package
    from edit_mobile.runtime.trajectory import TrajectoryRecorder

    package = load_package(packages[name])
    backends = {n: Recording(component_backend(package, n, "ort")) for n in package.components}
    recorder = TrajectoryRecorder(package, backends=backends)
    trajectory = recorder.record("  A Red Circle ", "blurry", steps=3, guidance=3.0, seed=1)
    inputs = recorder.inputs(trajectory)

    def same(a: dict, b: dict) -> bool:
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    calls = 2 // package.batch  # CFG: one call per step at batch 2, two at batch 1
    assert len(trajectory.calls) == len(trajectory.latents) == 3 and len(inputs["transformer"]) == 3 * calls
    assert [label["step"] for label, _ in inputs["transformer"]] == [i for i in range(3) for _ in range(calls)]
    for name_ in ("transformer", "vae_decoder", *(e.component for e in FAMILIES[name].text_encoders)):
        fed = backends[name_].seen
        got = [feed for _, feed in inputs[name_]]
        assert len(fed) == len(got) and all(same(a, b) for a, b in zip(fed, got)), name_
    assert [label for label, _ in inputs["text_encoder"]] == [{"input": "prompt"}, {"input": "negative_prompt"}]
    image = inputs["vae_encoder"][0][1]["sample"]
    assert image.shape == (1, 3, 64, 64) and image.min() >= -1 and image.max() <= 1
