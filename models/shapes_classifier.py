"""The shapes judge: a small CNN that reads a single-shape scene's four attributes back from an image.

`edit-mobile evaluate` scores a shapes model's prompt accuracy with it: each generated image is classified, and
the predicted shape / colour / size / background are compared with the prompt's (runtime/scenes.py). The
classifier's penultimate features also give a Fréchet distance between generated images and real renders.

It is trained here on procedural renders of every single-shape combination (`all_combinations()`, the held-out
ones included: it is the judge, not the student), with random placements and radii as in runtime/scenes.py and
light augmentation so that it also reads imperfect generated images: the scene rendered at a random resolution
between 48 and 128 px and resized (PIL bilinear) to 64, a slight Gaussian blur, a small brightness jitter and a
little Gaussian noise. Training is deterministic (fixed seeds; the renders are drawn from seeded generators) and
takes a few minutes on two CPU cores; `train_classifier(out_dir, seed=0)` writes the ONNX model and its JSON
config, which ship in models/assets and which the torch-free runtime (runtime/evaluate.py) loads.

ONNX model: input `image` float32 (N, 3, 64, 64) RGB in [0, 1] (dynamic N); outputs one logits tensor per
attribute in ATTRIBUTES order (`shape`, `color`, `size`, `background`) and `features` (N, feature_dim).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import ImageFilter
from torch import nn

from ..runtime.atomic import atomic_output_dir
from ..runtime.evaluate import to_input
from ..runtime.scenes import ATTRIBUTES, RADIUS, Scene, Shape, all_combinations, evaluation_scenes

logger = logging.getLogger(__name__)

ONNX_NAME = "shapes_classifier.onnx"
CONFIG_NAME = "shapes_classifier.json"
INPUT_NAME = "image"
FEATURES_NAME = "features"
OPSET = 17


@dataclass
class ClassifierConfig:
    """Architecture, training and augmentation settings; saved in the JSON beside the ONNX model."""

    resolution: int = 64  # classifier input side (images are resized to it, PIL bilinear)
    # one 3x3 conv + BN + ReLU per entry: the first with stride 2, then a 2x2 max pool before each from the third
    channels: tuple[int, ...] = (16, 32, 64, 64)
    feature_dim: int = 128  # penultimate features (the Fréchet distance's space)
    steps: int = 1200
    batch_size: int = 96
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    # augmentation
    render_min: int = 48  # render at a random side in [render_min, render_max], then resize to `resolution`
    render_max: int = 128
    blur_probability: float = 0.5
    blur_max: float = 1.0  # Gaussian blur radius (px at the render resolution), uniform in [0, blur_max]
    brightness: float = 0.08  # multiply by a uniform factor in [1 - b, 1 + b]
    noise_max: float = 0.04  # add Gaussian noise of a std uniform in [0, noise_max]
    # held-out check after training: fresh renders of the evaluation combinations, at these render sides
    eval_count: int = 1000
    eval_seed: int = 12345
    eval_resolutions: tuple[int, ...] = (64, 128, 256)
    threads: int | None = 1  # torch intra-op threads (1: reproducible, and fastest on a shared 2-core machine)
    attributes: dict[str, list[str]] = field(default_factory=lambda: {k: list(v) for k, v in ATTRIBUTES.items()})

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ClassifierConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("channels", "eval_resolutions"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)


class ShapesClassifier(nn.Module):
    """Conv stack (64 -> 32 -> 16 -> 8 px) -> global average + max pool -> features (Linear + ReLU) -> one linear
    head per attribute."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        layers, in_ch = [], 3
        for i, ch in enumerate(config.channels):
            if i >= 2:
                layers.append(nn.MaxPool2d(2))
            conv = nn.Conv2d(in_ch, ch, 3, stride=2 if i == 0 else 1, padding=1, bias=False)
            layers += [conv, nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
            in_ch = ch
        self.body = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Linear(2 * in_ch, config.feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleList(nn.Linear(config.feature_dim, len(v)) for v in config.attributes.values())

    def forward(self, image: torch.Tensor):
        x = self.body(image)
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        features = self.features(pooled)
        return (*(head(features) for head in self.heads), features)


# --- data --------------------------------------------------------------------------------------------------------
def random_scene(rng: random.Random, combo: tuple[str, str, str, str]) -> Scene:
    """A single-shape scene of `combo` (shape, colour, size, background) at a random placement, as scenes.py draws."""
    shape, color, size, background = combo
    radius = rng.uniform(*RADIUS[size])
    cx, cy = rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius)
    return Scene(background, (Shape(shape, color, size, cx, cy, radius),))


def augmented_batch(
    rng: random.Random, nprng: np.random.Generator, combos: list, config: ClassifierConfig, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """`count` augmented renders of random combinations: (float32 images (N,3,R,R), int64 labels (N, attributes))."""
    names = list(config.attributes)
    index = {k: {v: i for i, v in enumerate(values)} for k, values in config.attributes.items()}
    images, labels = [], []
    for _ in range(count):
        combo = rng.choice(combos)
        side = rng.randint(config.render_min, config.render_max)
        image = random_scene(rng, combo).render(side)
        if rng.random() < config.blur_probability:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, config.blur_max)))
        images.append(image)
        attrs = dict(zip(("shape", "color", "size", "background"), combo))
        labels.append([index[k][attrs[k]] for k in names])
    x = to_input(images, config.resolution)
    n = x.shape[0]
    x *= nprng.uniform(1 - config.brightness, 1 + config.brightness, (n, 1, 1, 1)).astype(np.float32)
    x += nprng.standard_normal(x.shape, dtype=np.float32) * nprng.uniform(0, config.noise_max, (n, 1, 1, 1)).astype(
        np.float32
    )
    return np.clip(x, 0.0, 1.0), np.asarray(labels, dtype=np.int64)


def heldout_set(count: int, seed: int, resolution: int, input_resolution: int = 64):
    """Fresh renders of `evaluation_scenes(count, seed)` at `resolution`, resized: (images, labels, scenes)."""
    scenes = evaluation_scenes(count, seed)
    images = to_input([s.render(resolution) for s in scenes], input_resolution)
    labels = np.asarray(
        [[list(ATTRIBUTES[k]).index(s.attributes()[k]) for k in ATTRIBUTES] for s in scenes], dtype=np.int64
    )
    return images, labels, scenes


# --- training ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def measure_accuracy(model: ShapesClassifier, images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-attribute accuracy and all-attributes-correct accuracy of `model` (eval mode) on a labelled set."""
    model.eval()
    preds = []
    for start in range(0, len(images), 256):
        out = model(torch.from_numpy(images[start : start + 256]))
        preds.append(np.stack([o.argmax(1).numpy() for o in out[:-1]], axis=1))
    correct = np.concatenate(preds) == labels
    acc = {k: float(correct[:, i].mean()) for i, k in enumerate(model.config.attributes)}
    acc["all"] = float(correct.all(axis=1).mean())
    return acc


def train_model(config: ClassifierConfig) -> tuple[ShapesClassifier, dict]:
    """Train a classifier deterministically from `config.seed`; returns it (eval mode) and the training figures."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng, nprng = random.Random(config.seed), np.random.default_rng(config.seed)
    combos = all_combinations()
    model = ShapesClassifier(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.15)
    loss_fn = nn.CrossEntropyLoss()
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(config.steps):
        x, y = augmented_batch(rng, nprng, combos, config, config.batch_size)
        out = model(torch.from_numpy(x))
        loss = sum(loss_fn(o, torch.from_numpy(y[:, i])) for i, o in enumerate(out[:-1]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 200 == 0 or step + 1 == config.steps:
            seconds = time.perf_counter() - start
            logger.info("step %d/%d loss %.4f (%.0f s)", step + 1, config.steps, np.mean(losses[-200:]), seconds)
    seconds = time.perf_counter() - start
    model.eval()
    heldout = {}
    for res in config.eval_resolutions:
        images, labels, _ = heldout_set(config.eval_count, config.eval_seed, res, config.resolution)
        heldout[str(res)] = measure_accuracy(model, images, labels)
    worst = {k: min(h[k] for h in heldout.values()) for k in [*config.attributes, "all"]}
    figures = {
        "seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "samples_seen": config.steps * config.batch_size,
        "final_loss": float(np.mean(losses[-100:])),
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_accuracy": heldout,  # render side -> accuracy (per attribute and all)
        "heldout_accuracy_worst": worst,
        "heldout": {"scenes": "evaluation_scenes", "count": config.eval_count, "seed": config.eval_seed},
        "torch": torch.__version__,
    }
    return model, figures


def export_onnx(model: ShapesClassifier, path: str | Path) -> Path:
    """ONNX (opset 17), input `image` (N, 3, R, R) with a dynamic batch axis; outputs per attribute + `features`."""
    model.eval()
    r = model.config.resolution
    names = [*model.config.attributes, FEATURES_NAME]
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, r, r),),
        str(path),
        input_names=[INPUT_NAME],
        output_names=names,
        opset_version=OPSET,
        dynamo=False,
        do_constant_folding=True,
        dynamic_axes={INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in names}},
    )
    return Path(path)


def classifier_metadata(config: ClassifierConfig, figures: dict) -> dict:
    """The JSON written beside the ONNX model: what the runtime needs to use it, the config and training figures."""
    return {
        "format": 1,
        "model": ONNX_NAME,
        "input": {"name": INPUT_NAME, "shape": ["N", 3, config.resolution, config.resolution], "range": [0.0, 1.0]},
        "resolution": config.resolution,
        "resize": "PIL bilinear",
        "attributes": dict(config.attributes),
        "outputs": {"logits": list(config.attributes), "features": FEATURES_NAME},
        "feature_dim": config.feature_dim,
        "config": config.to_json(),
        "training": figures,
    }


def train_classifier(
    out_dir: str | Path, seed: int = 0, steps: int | None = None, overwrite: bool = True, **overrides
) -> dict:
    """Train the shapes classifier and write `out_dir/shapes_classifier.onnx` + `shapes_classifier.json`.

    Deterministic for a given seed, config and thread count. `overrides` set other ClassifierConfig fields.
    Returns the metadata written to the JSON (its "training" entry has the measured held-out accuracy)."""
    config = ClassifierConfig(seed=seed, **overrides)
    if steps is not None:
        config.steps = steps
    model, figures = train_model(config)
    out_dir = Path(out_dir)
    meta = classifier_metadata(config, figures)
    if out_dir.is_dir():  # e.g. models/assets: write the two files, each atomically
        _write_files(model, meta, out_dir)
    else:
        with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
            _write_files(model, meta, tmp)
    return meta


def _write_files(model: ShapesClassifier, meta: dict, folder: Path) -> None:
    onnx_tmp, json_tmp = folder / f".{ONNX_NAME}.tmp", folder / f".{CONFIG_NAME}.tmp"
    try:
        export_onnx(model, onnx_tmp)
        meta["training"]["onnx_bytes"] = onnx_tmp.stat().st_size
        json_tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        onnx_tmp.replace(folder / ONNX_NAME)
        json_tmp.replace(folder / CONFIG_NAME)
    finally:
        onnx_tmp.unlink(missing_ok=True)
        json_tmp.unlink(missing_ok=True)
