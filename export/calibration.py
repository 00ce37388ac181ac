"""Calibration data for quantization: the real inputs of every component, recorded along sampling trajectories.

`record_calibration` runs the package's own text-to-image loop (numpy + ONNX Runtime, the trajectory recorder of
`runtime/trajectory.py`) on a few prompts and keeps, per component, exactly what that component was fed:
  transformer     every call at every denoising step (timestep-aware: all noise levels of the schedule, both CFG
                  halves), so static activation ranges cover the whole trajectory, not one random tensor;
  text encoders   the tokenized prompts and the empty negative prompt;
  vae_decoder     the final latents, unscaled as the runtime passes them;
  vae_encoder     the decoded images in [-1, 1] (what an image-to-image caller would encode).
No torch here: the recording uses the fp32 package itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.errors import UserError
from ..runtime.package import Package

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_COUNT = 4  # prompts taken, evenly spread, from the shipped list (models/assets/prompts.txt)
DEFAULT_STEPS = 10  # sampling steps per calibration prompt: every one of them is recorded


def default_prompts(count: int = DEFAULT_PROMPT_COUNT) -> list[str]:
    """`count` prompts spread evenly over the shipped prompt list (shapes, photos, art styles...)."""
    from ..models.presets import bundled_prompts

    prompts = bundled_prompts()
    picks = np.linspace(0, len(prompts) - 1, min(count, len(prompts))).round().astype(int)
    return [prompts[i] for i in picks]


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per non-empty line; UserError if the file is missing, unreadable or holds no prompt."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration prompt file {path} does not exist")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read calibration prompt file {path}: {e}") from None
    if not prompts:
        raise UserError(f"calibration prompt file {path} is empty (expected one prompt per line)")
    return prompts


@dataclass
class CalibrationSet:
    """Per component, the list of input feeds (name -> array, exactly the component's manifest inputs)."""

    prompts: list[str]
    steps: int
    guidance: float
    feeds: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    # transformer only: (prompt index, step index, timestep) of each feed, for reports and subset picking
    transformer_meta: list[tuple[int, int, float]] = field(default_factory=list)

    def summary(self) -> dict:
        timesteps = sorted({round(t, 3) for _, _, t in self.transformer_meta}, reverse=True)
        return {
            "prompts": len(self.prompts),
            "steps": self.steps,
            "guidance": self.guidance,
            "samples": {name: len(f) for name, f in self.feeds.items()},
            "timesteps": timesteps,
        }

    def subset(self, name: str, count: int) -> list[dict[str, np.ndarray]]:
        """Up to `count` feeds of one component, spread evenly (over prompts and timesteps for the transformer)."""
        return spread(self.feeds[name], count)


def spread(feeds: list, count: int) -> list:
    """Up to `count` items of `feeds`, evenly spaced (first and last included)."""
    picks = np.unique(np.linspace(0, len(feeds) - 1, min(count, len(feeds))).round().astype(int))
    return [feeds[i] for i in picks]


def record_calibration(
    package: Package,
    prompts: list[str],
    steps: int = DEFAULT_STEPS,
    guidance: float | None = None,
    seed: int = 0,
    threads: int | None = None,
    decode: bool = True,
) -> CalibrationSet:
    """Run the sampling loop of `package` on each prompt and record every component's real inputs
    (`runtime/trajectory.py`). `decode=False` skips the VAE decode, so records nothing for the VAE encoder."""
    from ..runtime.trajectory import TrajectoryRecorder

    if not prompts:
        raise UserError("no calibration prompts")
    if steps < 1:
        raise UserError(f"--calibration-steps must be >= 1, got {steps}")
    recorder = TrajectoryRecorder(package, threads=threads)
    guidance = recorder.default_guidance if guidance is None else float(guidance)
    calib = CalibrationSet(
        prompts=list(prompts), steps=steps, guidance=guidance, feeds={name: [] for name in package.components}
    )
    for p, trajectory in enumerate(recorder.record_prompts(prompts, steps, guidance, seed, decode)):
        for i, (t, calls) in enumerate(zip(trajectory.timesteps, trajectory.calls)):
            calib.transformer_meta += [(p, i, float(t))] * len(calls)
        for name, feeds in recorder.inputs(trajectory).items():
            if name in calib.feeds:  # views of the shared prompt embeddings: no copies per step
                specs = package.input_specs(name)
                calib.feeds[name] += [_cast(feed, specs) for _, feed in feeds]
    logger.info(
        "calibration: %d prompts x %d steps -> %s", len(prompts), steps, {k: len(v) for k, v in calib.feeds.items()}
    )
    return calib


def record_text_inputs(package: Package, prompts: list[str], components: list[str]) -> CalibrationSet:
    """The text encoders' real inputs for `prompts` without running any model: the family's prompt preprocessing
    and the package's tokenizers, exactly as the sampling loop feeds them. Enough when only text encoders are
    quantized, and it keeps their fp32 graphs (a true-size T5-XXL: 19 GB) from being loaded all at once."""
    from ..runtime.families import family
    from ..runtime.tokenizer import PromptTokenizer

    if not prompts:
        raise UserError("no calibration prompts")
    spec = family(package.family)
    calib = CalibrationSet(prompts=list(prompts), steps=0, guidance=spec.default_guidance, feeds={})
    for enc in spec.text_encoders:
        if enc.component in components:
            text = package.text_for(enc.component)
            tokenizer = PromptTokenizer(text.path, text.max_length, text.pad_id)
            # each prompt and the empty negative prompt of classifier-free guidance, as the loop encodes them
            encodings = [tokenizer.encode(spec.preprocess(t)) for p in prompts for t in (p, "")]
            specs = package.input_specs(enc.component)
            calib.feeds[enc.component] = [_cast(enc.feed(e), specs) for e in encodings]
    return calib


def _cast(values: dict[str, np.ndarray], specs) -> dict[str, np.ndarray]:
    """Keep exactly the component's inputs, in the manifest dtypes (the fp32 package's own)."""
    from ..runtime.io_specs import to_numpy_dtype

    return {s.name: np.ascontiguousarray(values[s.name], dtype=to_numpy_dtype(s.dtype)) for s in specs}


class FeedReader:
    """An `onnxruntime.quantization.CalibrationDataReader` over recorded feeds (ORT calls `get_next` until None)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = list(feeds)
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.feeds):
            return None
        self._next += 1
        return self.feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return len(self.feeds)

    def __iter__(self):
        return iter(self.feeds)


def feed_reader(feeds: list[dict[str, np.ndarray]]):
    """A FeedReader that also is an instance of ORT's CalibrationDataReader (imported lazily: needs onnx)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(FeedReader, CalibrationDataReader):
        pass

    return _Reader(feeds)
