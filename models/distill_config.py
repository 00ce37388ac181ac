"""What defines a distillation run (models/distill.py): the config saved beside every run and checkpoint, the
command-line parsers for its structured fields, and the progressive-resolution plan."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from ..runtime.errors import UserError

LOSSES = ("task", "output", "feature")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")
# Fields a resumed run may change; any other difference from the saved config is refused.
RESUME_MAY_CHANGE = {"out", "steps", "stage_steps", "checkpoint_every", "keep_checkpoints", "log_every", "cache_mb"}


@dataclass
class DistillConfig:
    """Everything that defines a distillation run; saved as distill_config.json in OUT and in every checkpoint."""

    teacher: str | None  # preset name or diffusers pipeline folder (PixArt-Σ or SD3); None: train from scratch
    student: str  # converted pipeline folder (`edit-mobile convert`); without a teacher, any pipeline folder
    out: str  # run + output folder
    data: str = "synthetic"  # image + caption folder (models/data.py), "synthetic" (1024 items) or "synthetic:N"
    resolutions: list[int] = field(default_factory=list)  # progressive stages in pixels; [] = teacher's native
    stage_steps: list[int] = field(default_factory=list)  # optimizer steps per stage; [] = split evenly
    steps: int = 1000  # optimizer steps in total
    batch_size: int = 4  # images per process per micro-step (global batch = this x processes x grad_accum)
    grad_accum: int = 1
    lr: float = 1e-4  # AdamW; linear warm-up over warmup_steps, then lr_schedule
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine": decays to 0 at `steps`
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the weights; it is what gets written
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss_weights: dict[str, float] = field(default_factory=lambda: {k: 1.0 for k in LOSSES})
    feature_prompt: bool = False  # SD3: also distil the prompt rows of the joint attention
    caption_dropout: float = 0.1  # fraction of empty captions (the unconditional branch of guidance)
    # Min-SNR-γ weighting of the task loss (ε-prediction): each sample weighted min(SNR, γ) / SNR, which takes weight
    # off the low-noise steps so that the high-noise ones, where the layout and colours are decided, count more.
    # None: uniform, as PixArt-Σ trains.
    snr_gamma: float | None = None
    mixed_precision: str = "auto"  # auto: bf16 on GPUs that have it, else fp16 on GPUs, no on CPU
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are deleted
    log_every: int = 10
    seed: int = 0
    max_text_tokens: int | None = None  # T5 tokens; None = the pipeline's default (300 PixArt-Σ, 256 SD3)
    cache_mb: int = 4096  # memory budget for cached latents and text encodings, per process

    def validate(self) -> DistillConfig:
        for name in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise UserError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0 or not self.max_grad_norm > 0:
            raise UserError("lr and max_grad_norm must be > 0, warmup_steps and weight_decay >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"ema decay must be in [0, 1), got {self.ema_decay}")
        if self.teacher is None and (self.weight("output") > 0 or self.weight("feature") > 0):
            raise UserError(
                "the output and feature losses compare with a teacher: pass --teacher, or train the task loss alone"
            )
        if self.snr_gamma is not None and not (self.snr_gamma > 0 and math.isfinite(self.snr_gamma)):
            raise UserError(f"snr gamma must be a positive number, got {self.snr_gamma!r}")
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"caption dropout must be in [0, 1), got {self.caption_dropout}")
        unknown = set(self.loss_weights) - set(LOSSES)
        if unknown or any(not (w >= 0 and math.isfinite(w)) for w in self.loss_weights.values()):
            raise UserError(f"loss weights must be {', '.join(LOSSES)} >= 0, got {self.loss_weights}")
        if not any(self.weight(k) > 0 for k in LOSSES):
            raise UserError("every loss weight is 0: nothing to train")
        if self.max_text_tokens is not None and (not isinstance(self.max_text_tokens, int) or self.max_text_tokens < 1):
            raise UserError(f"max text tokens must be a positive integer, got {self.max_text_tokens!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise UserError(f"mixed precision must be one of {', '.join(MIXED_PRECISION)}")
        for r in self.resolutions:
            if not isinstance(r, int) or r < 1:
                raise UserError(f"unknown resolution {r!r}: expected a positive number of pixels")
        if len(self.resolutions) > self.steps:
            raise UserError(f"{len(self.resolutions)} resolution stages need at least as many steps, got {self.steps}")
        if self.stage_steps:
            stages = max(len(self.resolutions), 1)
            if len(self.stage_steps) != stages or sum(self.stage_steps) != self.steps or min(self.stage_steps) < 1:
                raise UserError(
                    f"stage steps {self.stage_steps} must give one positive count per resolution "
                    f"({stages}) summing to steps ({self.steps})"
                )
        return self

    def weight(self, name: str) -> float:
        return float(self.loss_weights.get(name, 1.0))  # a name left out keeps the default weight 1

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warm-up, then constant or cosine to 0."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.lr_schedule == "cosine":
            progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
            return self.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return self.lr

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> DistillConfig:
        data = json.loads(Path(path).read_text())
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def parse_loss_weights(text: str) -> dict[str, float]:
    """'task=1,output=0.5,feature=2' -> dict; names left out keep their default 1.0."""
    weights = {k: 1.0 for k in LOSSES}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        try:
            if not sep or name.strip() not in LOSSES:
                raise ValueError
            weights[name.strip()] = float(value)
        except ValueError:
            raise UserError(
                f"bad --loss-weights item {item!r}: expected NAME=NUMBER with NAME one of "
                f"{', '.join(LOSSES)} (e.g. task=1,output=1,feature=0.5)"
            ) from None
    return weights


def parse_resolutions(values: list[str]) -> list[int]:
    out = []
    for v in values:
        try:
            r = int(v)
        except ValueError:
            raise UserError(f"unknown resolution {v!r}: expected a number of pixels, e.g. 512") from None
        out.append(r)
    return out


def stage_plan(config: DistillConfig, native: int) -> list[tuple[int, int]]:
    """[(first step, resolution), ...] for the progressive stages."""
    resolutions = config.resolutions or [native]
    counts = config.stage_steps or [config.steps // len(resolutions)] * len(resolutions)
    counts = list(counts[:-1]) + [config.steps - sum(counts[:-1])]  # the last stage takes the remainder
    starts = np.cumsum([0] + counts[:-1]).tolist()
    return list(zip(starts, resolutions))


def stage_at(plan, step: int) -> tuple[int, int]:
    index = max(i for i, (start, _) in enumerate(plan) if start <= step)
    return index, plan[index][1]


def differing_keys(ours: dict, theirs: dict, ignore=()) -> list[str]:
    """The keys of `theirs` whose value differs in `ours` (a tuple equals the list that JSON made of it)."""

    def norm(v):
        return list(v) if isinstance(v, tuple) else v

    return [k for k, v in theirs.items() if not k.startswith("_") and k not in ignore and norm(ours.get(k)) != norm(v)]
