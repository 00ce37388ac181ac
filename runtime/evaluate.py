"""Prompt accuracy of the shapes models: generate one image per single-shape caption, read its attributes back with
the shipped shapes classifier, and compare them with the caption's (numpy + ONNX Runtime + PIL, no torch).

Prompts are `evaluation_scenes(N, seed)` (held-out attribute combinations: runtime/scenes.py) or the lines of a
prompt file, each a single-shape caption ('a large red circle on a white background'). Prompt i is generated with
seed `seed + i`: the runtime's numpy initial noise, which the diffusers path (export/evaluate_torch.py, imported
only for a diffusers source) passes to diffusers as `latents`, so both paths start from the same latents.

Report (JSON-ready dict):
  accuracy          {"all": fraction of prompts with every attribute right, "shape": ..., "color": ..., ...}
  frechet_distance  between the classifier features of the generated images and of real renders of the same
                    scenes (rendered at the generated resolution; the Fréchet distance of FID, on 128-d features)
  reference_accuracy  the classifier on those real renders (its own error floor on these scenes)
  prompts           [{prompt, seed, expected, predicted, confidence, attributes_correct, correct}]
  target, kind ("package" | "diffusers"), family, resolution, steps, guidance, seed, prompt_source, count,
  classifier, seconds
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .atomic import write_file_atomic
from .errors import UserError
from .scenes import ATTRIBUTES, RADIUS, Scene, Shape, evaluation_scenes, parse_caption

logger = logging.getLogger(__name__)

CLASSIFIER_ONNX = "shapes_classifier.onnx"
CLASSIFIER_JSON = "shapes_classifier.json"
DEFAULT_PROMPTS = 16


# --- the classifier ----------------------------------------------------------------------------------------------
def default_classifier_path() -> Path:
    """models/assets/shapes_classifier.onnx of the installed package, found without importing edit_mobile.models
    (whose __init__ imports torch)."""
    spec = importlib.util.find_spec("edit_mobile.models")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("edit_mobile.models is not installed: pass the classifier's path")
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / CLASSIFIER_ONNX


def to_input(images: Sequence[Image.Image], resolution: int = 64) -> np.ndarray:
    """PIL images (any size) -> float32 (N, 3, R, R) in [0, 1], resized with PIL bilinear: the classifier's input,
    the same in its training (models/shapes_classifier.py) and in scoring."""
    arrays = []
    for im in images:
        im = im.convert("RGB")
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.BILINEAR)
        arrays.append(np.asarray(im, dtype=np.uint8))
    return np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)


class ShapesClassifier:
    """The shipped attribute classifier on ONNX Runtime: PIL images -> per-attribute probabilities and features."""

    def __init__(self, path: str | Path | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path) if path is not None else default_classifier_path()
        config_path = self.path.with_suffix(".json")
        if not self.path.is_file() or not config_path.is_file():
            raise UserError(f"shapes classifier not found: {self.path} and {config_path.name} beside it are needed")
        try:
            self.meta = json.loads(config_path.read_text(encoding="utf-8"))
            self.attributes = {k: list(v) for k, v in self.meta["attributes"].items()}
            self.resolution = int(self.meta["resolution"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{config_path}: not a shapes classifier config ({e})") from None
        if list(self.attributes) != list(ATTRIBUTES):
            raise UserError(f"{config_path}: attributes {list(self.attributes)}, expected {list(ATTRIBUTES)}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [*self.attributes, self.meta.get("outputs", {}).get("features", "features")]
        missing = set(self.output_names) - {o.name for o in self.session.get_outputs()}
        if missing:
            raise UserError(f"{self.path}: outputs {sorted(missing)} missing")

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        return to_input(images, self.resolution)

    def __call__(self, images: Sequence[Image.Image], batch: int = 64) -> dict:
        """{"probabilities": {attribute: (N, values)}, "predicted": [{attribute: value}], "confidence":
        [{attribute: probability of the predicted value}], "features": (N, D) float64}."""
        if not len(images):
            raise ValueError("no images to classify")
        outs = [[] for _ in self.output_names]
        for start in range(0, len(images), batch):
            x = self.preprocess(images[start : start + batch])
            for acc, out in zip(outs, self.session.run(self.output_names, {self.input_name: x})):
                acc.append(out)
        logits = {k: np.concatenate(o).astype(np.float64) for k, o in zip(self.attributes, outs)}
        probs = {k: _softmax(v) for k, v in logits.items()}
        index = {k: p.argmax(axis=1) for k, p in probs.items()}
        n = len(images)
        return {
            "probabilities": probs,
            "predicted": [{k: self.attributes[k][int(index[k][i])] for k in self.attributes} for i in range(n)],
            "confidence": [{k: float(probs[k][i, index[k][i]]) for k in self.attributes} for i in range(n)],
            "features": np.concatenate(outs[-1]).astype(np.float64),
        }


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# --- metrics -----------------------------------------------------------------------------------------------------
def _covariance(x: np.ndarray) -> np.ndarray:
    if x.shape[0] < 2:  # one sample: no spread to estimate (np.cov would give NaN)
        return np.zeros((x.shape[1], x.shape[1]))
    return np.cov(x, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (eigendecomposition; round-off negatives -> 0)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N_a, D) and (N_b, D), as FID computes it:
    |mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^1/2).

    numpy only: tr((C_a C_b)^1/2) = tr((S C_b S)^1/2) with S = C_a^1/2, and S C_b S is symmetric positive
    semi-definite, so both roots come from `eigh` with round-off negatives clipped to 0. This stays finite and
    >= 0 for singular covariances (fewer samples than dimensions, a single sample, identical rows)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or not len(a) or not len(b):
        raise ValueError(f"expected two (N, D) feature sets with the same D, got {a.shape} and {b.shape}")
    ca, cb = _covariance(a), _covariance(b)
    s = _sqrt_psd(ca)
    product = s @ cb @ s
    w = np.linalg.eigvalsh((product + product.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(w, 0.0, None)).sum())
    diff = a.mean(axis=0) - b.mean(axis=0)
    return max(float(diff @ diff + np.trace(ca) + np.trace(cb) - 2.0 * tr_covmean), 0.0)


def accuracy(predicted: list[dict[str, str]], expected: list[dict[str, str]]) -> dict[str, float]:
    """{"all": fraction with every attribute right, attribute: fraction right}."""
    if len(predicted) != len(expected) or not expected:
        raise ValueError("accuracy needs as many predictions as expectations, at least one")
    result = {"all": float(np.mean([all(p[k] == e[k] for k in ATTRIBUTES) for p, e in zip(predicted, expected)]))}
    result.update({k: float(np.mean([p[k] == e[k] for p, e in zip(predicted, expected)])) for k in ATTRIBUTES})
    return result


# --- prompts -----------------------------------------------------------------------------------------------------
def scene_for(attributes: dict[str, str], seed: int, index: int) -> Scene:
    """The single-shape scene of `attributes` with a seeded placement (the reference render of a file prompt)."""
    rng = random.Random(seed * 1_000_003 + 7_919 * (index + 1))
    radius = rng.uniform(*RADIUS[attributes["size"]])
    cx, cy = rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius)
    shape = Shape(attributes["shape"], attributes["color"], attributes["size"], cx, cy, radius)
    return Scene(attributes["background"], (shape,))


def read_prompt_file(path: str | Path) -> list[str]:
    """One caption per line (blank lines and '#' comments skipped); each must be a single-shape caption."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file {path}: {getattr(e, 'strerror', None) or e}") from None
    lines = [line.strip() for line in text.splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {path} has no prompts (one caption per line)")
    for i, prompt in enumerate(prompts):
        try:
            parse_caption(prompt)
        except UserError as e:
            raise UserError(f"{path}: prompt {i + 1}: {e}") from None
    return prompts


def evaluation_prompts(
    prompts: int | None = None, seed: int = 0, prompt_file: str | Path | None = None
) -> tuple[list[str], list[Scene], str]:
    """(captions, reference scenes, source): `evaluation_scenes(prompts, seed)`, or the file's captions (the first
    `prompts` of them when given) with seeded placements."""
    if prompts is not None and (isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 1):
        raise UserError(f"--prompts must be an integer >= 1, got {prompts!r}")
    if prompt_file is None:
        scenes = evaluation_scenes(DEFAULT_PROMPTS if prompts is None else prompts, seed)
        return [s.caption for s in scenes], scenes, "evaluation_scenes"
    captions = read_prompt_file(prompt_file)[:prompts]
    scenes = [scene_for(parse_caption(c), seed, i) for i, c in enumerate(captions)]
    return captions, scenes, str(prompt_file)


# --- generation --------------------------------------------------------------------------------------------------
def _is_package(target: str | Path) -> bool:
    return (Path(target) / "manifest.json").is_file()


def generate_with_package(
    package_dir: str | Path,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance: float | None,
    resolution: int | None = None,
    backend: str | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> tuple[list[Image.Image], dict]:
    """One image per prompt through the numpy runtime (Text2ImagePipeline), seed i -> its numpy initial noise."""
    from .backends import backend_for_target
    from .families import family
    from .package import load_package
    from .pipeline import Text2ImagePipeline

    package = load_package(package_dir)
    backend = backend or backend_for_target(package.target)  # Core ML packages: Core ML, or its reference executor
    pipe = Text2ImagePipeline(package, backend=backend, threads=threads, progress=progress)
    h, w = pipe.package.resolution
    if resolution is not None and (resolution, resolution) != (h, w):
        raise UserError(f"package was exported for {h}x{w}, not {resolution}x{resolution}")
    guidance = family(pipe.family).default_guidance if guidance is None else float(guidance)
    images = []
    for prompt, seed in zip(prompts, seeds):
        result = pipe(prompt, steps=steps, guidance=guidance, seed=seed)
        images.append(Image.fromarray(result.image))
    return images, {"kind": "package", "family": pipe.family, "resolution": [h, w], "guidance": guidance}


def generate(
    target: str | Path,
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance: float | None = None,
    resolution: int | None = None,
    backend: str | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> tuple[list[Image.Image], dict]:
    """A package folder -> the numpy runtime; a preset name or diffusers pipeline folder -> diffusers (torch)."""
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if resolution is not None and resolution < 1:
        raise UserError(f"--resolution must be >= 1, got {resolution}")
    if _is_package(target):
        return generate_with_package(target, prompts, seeds, steps, guidance, resolution, backend, threads, progress)
    path = Path(target)
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise UserError(f"{target} is neither a package (no manifest.json) nor a diffusers pipeline folder")
    from ..export.evaluate_torch import generate_with_diffusers  # torch: only for a diffusers source

    return generate_with_diffusers(str(target), prompts, seeds, steps, guidance, resolution, progress)


# --- evaluate ----------------------------------------------------------------------------------------------------
def score(
    images: Sequence[Image.Image],
    prompts: list[str],
    scenes: list[Scene],
    seeds: list[int],
    classifier: ShapesClassifier,
) -> dict:
    """Classify the generated images and real renders of the same scenes; accuracy, Fréchet distance, per prompt."""
    expected = [parse_caption(p) for p in prompts]
    side = max(images[0].size)
    renders = [s.render(side) for s in scenes]
    got, ref = classifier(list(images)), classifier(renders)
    rows = []
    for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
        right = {k: got["predicted"][i][k] == expected[i][k] for k in ATTRIBUTES}
        rows.append(
            {
                "prompt": prompt,
                "seed": seed,
                "expected": expected[i],
                "predicted": got["predicted"][i],
                "confidence": {k: round(v, 4) for k, v in got["confidence"][i].items()},
                "attributes_correct": right,
                "correct": all(right.values()),
            }
        )
    return {
        "accuracy": accuracy(got["predicted"], expected),
        "frechet_distance": frechet_distance(got["features"], ref["features"]),
        "reference_accuracy": accuracy(ref["predicted"], expected),
        "prompts": rows,
    }


def evaluate_with_images(
    target: str | Path,
    prompts: int | None = None,
    seed: int = 0,
    steps: int = 20,
    guidance: float | None = None,
    prompt_file: str | Path | None = None,
    resolution: int | None = None,
    classifier: str | Path | None = None,
    backend: str | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> tuple[dict, list[Image.Image]]:
    """`evaluate`, also returning the generated images (PIL, in prompt order)."""
    start = time.perf_counter()
    captions, scenes, source = evaluation_prompts(prompts, seed, prompt_file)  # bad prompts fail before any work
    judge = ShapesClassifier(classifier, threads=threads)
    seeds = [seed + i for i in range(len(captions))]
    images, info = generate(target, captions, seeds, steps, guidance, resolution, backend, threads, progress)
    scores = score(images, captions, scenes, seeds, judge)
    report = {
        "target": str(target),
        **info,
        "steps": steps,
        "seed": seed,
        "prompt_source": source,
        "count": len(captions),
        "accuracy": scores["accuracy"],
        "frechet_distance": scores["frechet_distance"],
        "reference_accuracy": scores["reference_accuracy"],
        "classifier": {
            "path": str(judge.path),
            "heldout_accuracy_worst": judge.meta.get("training", {}).get("heldout_accuracy_worst"),
        },
        "prompts": scores["prompts"],
        "seconds": round(time.perf_counter() - start, 2),
    }
    return report, images


def evaluate(
    target: str | Path,
    prompts: int | None = None,
    seed: int = 0,
    steps: int = 20,
    guidance: float | None = None,
    prompt_file: str | Path | None = None,
    resolution: int | None = None,
    classifier: str | Path | None = None,
    backend: str | None = None,
    threads: int | None = None,
    progress: bool = False,
) -> dict:
    """Generate one image per prompt with `target` (a package folder: numpy runtime; a preset or diffusers pipeline
    folder: diffusers) and score it with the shapes classifier. `prompts`: how many `evaluation_scenes(prompts,
    seed)` (default 16), or with `prompt_file` the first `prompts` of its lines (default all). Prompt i uses seed
    `seed + i`. `resolution`: diffusers only (default: the transformer's sample size); a package has its own."""
    report, _ = evaluate_with_images(
        target, prompts, seed, steps, guidance, prompt_file, resolution, classifier, backend, threads, progress
    )
    return report


# --- output ------------------------------------------------------------------------------------------------------
def write_json_atomic(data: dict, path: str | Path) -> Path:
    """Write JSON to a temporary file in the same folder, then rename it into place."""
    return write_file_atomic(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode("utf-8")))


def image_grid(images: Sequence[Image.Image], report: dict, tile: int = 160, columns: int = 4) -> np.ndarray:
    """uint8 (H, W, 3) grid: each image with its caption and, when wrong, the prediction; green border = every
    attribute right, red = not."""
    rows = report["prompts"]
    columns = max(1, min(columns, len(images)))
    text_lines, line_h, pad = 4, 12, 4
    cell_w, cell_h = tile + 2 * pad, tile + 2 * pad + text_lines * line_h
    n_rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell_w, n_rows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (image, row) in enumerate(zip(images, rows)):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        colour = (30, 160, 60) if row["correct"] else (210, 40, 40)
        draw.rectangle((x + 1, y + 1, x + cell_w - 2, y + tile + 2 * pad - 2), outline=colour, width=3)
        grid.paste(image.convert("RGB").resize((tile, tile), Image.BILINEAR), (x + pad, y + pad))
        lines = textwrap.wrap(row["prompt"], width=tile // 6)[:2]
        if not row["correct"]:
            p = row["predicted"]
            lines += textwrap.wrap(f"got: {p['size']} {p['color']} {p['shape']} on {p['background']}", tile // 6)
        for j, line in enumerate(lines[:text_lines]):
            draw.text((x + pad, y + tile + 2 * pad + j * line_h), line, fill=(0, 0, 0) if j < 2 else colour)
    return np.asarray(grid)


def format_report(report: dict) -> str:
    acc, ref = report["accuracy"], report["reference_accuracy"]
    names = ["all", *ATTRIBUTES]
    h, w = report["resolution"]
    lines = [
        f"{report['target']} ({report['kind']}, {report['family']}, {h}x{w}): {report['count']} prompts "
        f"({report['prompt_source']}), {report['steps']} steps, guidance {report['guidance']}, seed {report['seed']}",
        f"{'':<22}" + "".join(f"{n:>12}" for n in names),
        f"{'accuracy':<22}" + "".join(f"{acc[n]:>12.3f}" for n in names),
        f"{'real renders':<22}" + "".join(f"{ref[n]:>12.3f}" for n in names),
        f"Fréchet distance (classifier features, vs real renders): {report['frechet_distance']:.3f}",
    ]
    return "\n".join(lines)
