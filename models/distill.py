"""Distil an EDiT / MM-EDiT student from its teacher (DESIGN.md §1, "convert, then distill"), on 🤗 Accelerate.

    loss = w_task    * task loss     (PixArt-Σ: ε-prediction MSE; SD3: rectified-flow velocity MSE)
         + w_output  * output loss   (student vs frozen teacher prediction, same noisy input and timestep)
         + w_feature * feature loss  (each block's self-attention output vs the teacher's, mean over layers)

Noise: PixArt-Σ adds DDPM noise with the betas of the pipeline's scheduler config (`DDPMScheduler.from_config`),
t ~ U{0..T-1}; the transformer predicts 2C channels (ε and the learned variance): the task loss uses the first C,
the output loss all 2C. SD3 follows rectified flow: x_t = (1-σ) x0 + σ ε, target ε - x0, σ from SD3's
logit-normal density (u = sigmoid(n), n ~ N(0, 1)) mapped through the scheduler's shift
(σ = s·u / (1 + (s-1)·u), as `FlowMatchEulerDiscreteScheduler`'s shifted sigmas), timestep = σ·T.

The same code runs on one process or data-parallel on many (`accelerate launch --num_processes K ...`): the
student is `accelerator.prepare`d (DDP), every rank draws its own slice of each global batch, gradients are
averaged. Data order, caption dropout, noise level and noise are pure functions of (seed, sample position), so a
run resumed from a checkpoint repeats the uninterrupted run bit for bit (with the same number of processes), and
K processes with batch B compute what one process with batch K*B does (up to float rounding).

Output folder layout (OUT):
    distill_config.json, trainer_state.json, losses.csv, losses.png    the run
    checkpoints/step-N/                                                 transformer/ (safetensors), optimizer,
                                                                        RNG states, distill_config.json,
                                                                        trainer_state.json
    model_index.json, transformer/, text_encoder/, vae/, ...            the distilled pipeline (diffusers layout),
                                                                        written when training ends; model_index.json
                                                                        last, so OUT loads as a pipeline only once
                                                                        every component is in place
"""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime.errors import UserError
from .convert import load_pipeline, pipeline_family
from .data import PipelineEncoder, open_source
from .families import STUDENT_CLASSES, TEACHER_CLASSES, torch_family
from .presets import PRESETS

logger = logging.getLogger(__name__)

LOSSES = ("task", "output", "feature")
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")
# Teacher / student classes, convert --arch, noise process and distilled layers per family: models/families.py.
# Fields a resumed run may change; any other difference from the saved config is refused.
RESUME_MAY_CHANGE = {"out", "steps", "stage_steps", "checkpoint_every", "keep_checkpoints", "log_every", "cache_mb"}
CSV_COLUMNS = ["step", "stage", "resolution", "loss", *LOSSES, "lr", "sec_per_step", "sec_per_image"]


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


def seeded(*numbers: int) -> torch.Generator:
    """A CPU generator seeded with a hash of the given numbers (seed, sample position, ...): no hidden RNG state."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(numbers)).generate_state(1)[0]))


class IndexSampler:
    """Global sample position -> data index; one seeded permutation per epoch. Rank r of K takes the r-th slice
    of each micro-step's global batch, so the data order is a pure function of (seed, step), resumable exactly.
    (K processes with batch B visit the same positions as one process with batch K*B.)"""

    def __init__(self, size: int, seed: int, batch: int, processes: int, accum: int):
        self.size, self.seed, self.batch, self.processes, self.accum = size, seed, batch, processes, accum
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.size, generator=seeded(self.seed, epoch, 7919)).tolist()}
        return self._perms[epoch]

    def positions(self, step: int, micro: int, rank: int) -> list[int]:
        start = ((step * self.accum + micro) * self.processes + rank) * self.batch
        return list(range(start, start + self.batch))

    def index(self, position: int) -> int:
        return self._perm(position // self.size)[position % self.size]

    def indices(self, step: int, micro: int, rank: int) -> list[int]:
        return [self.index(c) for c in self.positions(step, micro, rank)]


class FeatureTap:
    """Forward hooks that collect the outputs of attention modules, in call order."""

    def __init__(self, modules, with_prompt: bool):
        self.with_prompt, self.outputs = with_prompt, []
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, args, output):
        if isinstance(output, tuple):  # SD3 joint attention: (image rows, prompt rows)
            self.outputs.append(output[0])
            if self.with_prompt and not getattr(module, "context_pre_only", False):
                self.outputs.append(output[1])  # the last block's prompt rows are discarded by the model
        else:
            self.outputs.append(output)

    def take(self) -> list:
        out, self.outputs = self.outputs, []
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def attention_modules(transformer, family: str, student_edit) -> list:
    """The self-attention modules EDiT replaces (the family's `attention_modules`, models/families.py): PixArt
    `attn1`; SD3 joint `attn` (+ SD3.5's image-only `attn2` where the student converted it)."""
    return torch_family(family).attention_modules(transformer, student_edit)


class Objective:
    """Noise schedule, transformer calls and the three losses for one pipeline family (its noise process and
    transformer call come from the family registry, models/families.py)."""

    def __init__(
        self,
        family: str,
        scheduler_config,
        teacher,
        config: DistillConfig,
        teacher_tap,
        student_tap,
        autocast=contextlib.nullcontext,
        vae_scale: int = 8,
    ):
        self.family, self.teacher, self.config = family, teacher, config
        self.teacher_tap, self.student_tap = teacher_tap, student_tap
        self.autocast, self.vae_scale = autocast, vae_scale  # the teacher is not `prepare`d: autocast it here
        self.additional_conditions = False  # PixArt-α 1024's micro-conditions; set by distill() from the config
        self._family = torch_family(family)
        self.noise = self._family.noise(scheduler_config)  # DDPM ε-prediction (PixArt-Σ), flow matching (SD3)
        self.num_timesteps = self.noise.num_timesteps

    def sample_u(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """The noise level of `n` samples as u in [0, 1) (the family's timestep density)."""
        return self.noise.sample_u(n, generator)

    def noisy(self, x0, u, noise):
        """u in [0, 1) per sample -> (x_t, timestep, task target)."""
        return self.noise.noisy(x0, u, noise)

    def predict(self, model, x_t, timestep, text):
        kwargs = text.kwargs()
        kwargs.update(self._family.call_kwargs(x_t, self.additional_conditions, self.vae_scale))
        return model(x_t, timestep=timestep, return_dict=False, **kwargs)[0]

    def losses(self, student, x0, text, u, noise) -> dict[str, torch.Tensor]:
        x_t, timestep, target = self.noisy(x0, u, noise)
        self.teacher_tap.take(), self.student_tap.take()
        need_teacher = self.config.weight("output") > 0 or self.config.weight("feature") > 0
        if need_teacher:
            with torch.no_grad(), self.autocast():
                teacher_out = self.predict(self.teacher, x_t, timestep, text).float()
        teacher_feats = self.teacher_tap.take()
        out = self.predict(student, x_t, timestep, text).float()
        student_feats = self.student_tap.take()
        c = x0.shape[1]
        parts = {"task": F.mse_loss(out[:, :c], target.float())}  # PixArt: ε channels only (not the variance)
        zero = out.new_zeros(())
        parts["output"] = F.mse_loss(out, teacher_out) if need_teacher else zero
        if need_teacher and self.config.weight("feature") > 0:
            if len(student_feats) != len(teacher_feats):
                raise RuntimeError(f"feature taps disagree: {len(student_feats)} vs {len(teacher_feats)} outputs")
            parts["feature"] = torch.stack(
                [F.mse_loss(s.float(), t.float()) for s, t in zip(student_feats, teacher_feats)]
            ).mean()
        else:
            parts["feature"] = zero
        parts["loss"] = sum(self.config.weight(k) * parts[k] for k in LOSSES)
        return parts


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_teacher(teacher_src: str, class_name: str | None) -> str:
    """The teacher must be an unconverted PixArt-Σ / SD3 transformer; returns its family."""
    if class_name in TEACHER_CLASSES:
        return TEACHER_CLASSES[class_name]
    if class_name in STUDENT_CLASSES:
        raise UserError(
            f"teacher {teacher_src} has a {class_name} transformer (already converted); a teacher must "
            f"be the unconverted {torch_family(STUDENT_CLASSES[class_name]).teacher.__name__}"
        )
    raise UserError(
        f"teacher {teacher_src} has a {class_name or 'missing'} transformer; expected one of "
        f"{', '.join(TEACHER_CLASSES)}"
    )


def precheck_folder_teacher(config: DistillConfig) -> None:
    """A teacher folder's and the student's configs are checked from their JSON files, before minutes of loading."""
    path = Path(config.teacher)
    if config.teacher in PRESETS or not (path / "model_index.json").is_file():
        return  # presets are checked once built; load_pipeline explains what is wrong with anything else
    teacher_config = _read_json(path / "transformer" / "config.json")
    family = check_teacher(config.teacher, teacher_config.get("_class_name"))
    check_student(config.student, family, teacher_config, config.teacher)


def check_student(student_dir: str, family: str, teacher_config, teacher_src: str):
    """Refuse a student that is not an EDiT / MM-EDiT conversion of this teacher's architecture; return its class."""
    path = Path(student_dir)
    if str(student_dir) in PRESETS or not (path / "model_index.json").is_file():
        raise UserError(
            f"student {student_dir} is not a converted pipeline folder (make one with "
            f"`edit-mobile convert {teacher_src} --arch {torch_family(family).arch} --out DIR`)"
        )
    config = _read_json(path / "transformer" / "config.json")
    name = config.get("_class_name")
    if name not in STUDENT_CLASSES:
        raise UserError(
            f"student {student_dir} holds a {name or 'missing'} transformer, not an EDiT / MM-EDiT "
            f"model (convert it first with `edit-mobile convert`)"
        )
    if STUDENT_CLASSES[name] != family:
        raise UserError(
            f"teacher and student architectures differ: teacher {teacher_src} is a {family} pipeline, "
            f"student {student_dir} holds a {name} (a {STUDENT_CLASSES[name]} conversion)"
        )
    diffs = [
        f"{k} {config.get(k)!r} vs teacher {v!r}"
        for k, v in teacher_config.items()
        if not k.startswith("_") and _norm(config.get(k)) != _norm(v)
    ]
    if diffs:
        raise UserError(f"student {student_dir} does not match the teacher's transformer: {'; '.join(diffs[:3])}")
    return torch_family(family).student


def _norm(v):
    return list(v) if isinstance(v, tuple) else v


def latest_checkpoint(root: Path) -> Path | None:
    steps = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.name.split("-")[1].isdigit())
    return steps[-1][1] if steps else None


def state_digest(model) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes): equal digests = identical weights."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        v = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{key}:{v.dtype}:{tuple(value.shape)};".encode())
        h.update(v.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def plot_losses(csv_path: Path, png_path: Path, plan) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("loss", *LOSSES):
        values = [float(r[name]) for r in rows]
        if any(v > 0 for v in values):
            ax.plot(steps, values, label=name, linewidth=1.5 if name == "loss" else 1)
    for start, res in plan[1:]:
        ax.axvline(start, color="grey", linestyle=":", linewidth=1)
        ax.text(start, ax.get_ylim()[1], f" {res}px", va="top", fontsize=8, color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (weighted total and components)")
    ax.set_title(f"distillation losses ({plan[0][1]}px" + (f" → {plan[-1][1]}px)" if len(plan) > 1 else ")"))
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _freeze_unused(student, objective: Objective, encoder, source, indices, resolution) -> None:
    """Freeze the parameters the student's forward never reaches, found with one forward / backward.

    MM-EDiT leaves some teacher weights dead: SD3's last block discards its prompt rows (so its prompt queries and
    image-key norm go unused) and EDiT's linear attention does not use the QK-norm of SD3.5's converted `attn2`.
    Frozen, they keep the teacher's values, every trainable parameter gets a gradient in every step, and DDP needs
    no `find_unused_parameters` (which would cost a graph traversal per step).
    """
    x0 = encoder.latents(source, indices, resolution)
    text = encoder.text([source.caption(i) for i in indices])
    u = torch.full((len(indices),), 0.5)
    x_t, timestep, _ = objective.noisy(x0, u, torch.zeros_like(x0))
    with objective.autocast():
        out = objective.predict(student, x_t, timestep, text)
    out.float().square().mean().backward()
    unused = [(n, p) for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
    for _, p in unused:
        p.requires_grad_(False)
    student.zero_grad(set_to_none=True)
    objective.student_tap.take()
    if unused:
        logger.info(
            "froze %d parameter tensors that the student's forward does not use (%s%s)",
            len(unused),
            ", ".join(n for n, _ in unused[:3]),
            ", ..." if len(unused) > 3 else "",
        )


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def _resolve_mixed_precision(mode: str) -> str:
    if mode != "auto":
        return mode
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _check_output(config: DistillConfig, resume: bool, overwrite: bool) -> None:
    """Fail before any model is loaded: existing folder without --resume, unwritable place, resume mismatch."""
    out = Path(config.out)
    if config.teacher is None and not (Path(config.student) / "model_index.json").is_file():
        raise UserError(
            f"without --teacher, --student must be a diffusers pipeline folder to train (got {config.student})"
        )
    if out.resolve() in {Path(p).resolve() for p in (config.teacher, config.student, config.data) if p}:
        raise UserError(f"--out {out} must not be the teacher, student or data folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"cannot write {out}: it exists and is not a folder")
    if out.exists() and not resume and not overwrite:
        raise UserError(
            f"output folder {out} already exists (pass --resume to continue its run, --overwrite to "
            f"replace it, or choose another --out)"
        )
    parent = out.parent if str(out.parent) else Path(".")
    if not out.exists():
        if not parent.is_dir():
            raise UserError(f"cannot write {out}: parent folder {parent} does not exist or is not a folder")
        if not _writable(parent):
            raise UserError(f"cannot write {out}: parent folder {parent} is not writable")
    elif not _writable(out):
        raise UserError(f"cannot write {out}: folder is not writable")
    if resume and out.exists():
        saved_path = out / "distill_config.json"
        if not saved_path.is_file():
            raise UserError(f"cannot resume: {out} holds no distillation run (distill_config.json is missing)")
        saved = DistillConfig.load(saved_path).to_dict()
        diffs = [
            f"{k} {saved.get(k)!r} -> {v!r}"
            for k, v in config.to_dict().items()
            if k not in RESUME_MAY_CHANGE and _norm(saved.get(k)) != _norm(v)
        ]
        if diffs:
            raise UserError(f"cannot resume {out} with different settings: {'; '.join(diffs[:3])}")


def _prepare_output_folder(accelerator, config: DistillConfig, resume: bool, overwrite: bool) -> None:
    """Main process creates OUT; every process learns whether that worked (no rank waits on a failed one)."""
    from accelerate.utils import broadcast_object_list

    error = [None]
    if accelerator.is_main_process:
        out = Path(config.out)
        try:
            if out.exists() and overwrite and not resume:
                shutil.rmtree(out)
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            if not (out / "distill_config.json").exists() or not resume:
                config.save(out / "distill_config.json")
        except OSError as e:
            error = [f"cannot write {out}: {e.strerror or e}"]
    if accelerator.num_processes > 1:
        broadcast_object_list(error)
    if error[0]:
        raise UserError(error[0])


def _write_pipeline(student_dir: Path, transformer, out: Path, info: dict) -> None:
    """Copy the student pipeline's components (the teacher's text encoders, tokenizers, VAE, scheduler), save the
    distilled transformer, then move everything into OUT with model_index.json last (the commit)."""
    index = json.loads((student_dir / "model_index.json").read_text())
    stage = out / ".pipeline.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        for name in [k for k in index if not k.startswith("_") and k != "transformer"]:
            src = student_dir / name
            if src.is_dir():
                shutil.copytree(src, stage / name)
        transformer.save_pretrained(stage / "transformer", safe_serialization=True)
        meta = _read_json(student_dir / "edit_mobile.json")
        meta["distilled" if info["teacher"] else "trained"] = info
        (stage / "edit_mobile.json").write_text(json.dumps(meta, indent=2) + "\n")
        shutil.copy2(student_dir / "model_index.json", stage / "model_index.json")
        (out / "model_index.json").unlink(missing_ok=True)  # un-commit an older output before replacing it
        for entry in sorted(stage.iterdir(), key=lambda p: p.name == "model_index.json"):
            dest = out / entry.name
            if dest.is_dir():
                shutil.rmtree(dest)
            entry.replace(dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def distill(config: DistillConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run (or resume) a distillation; returns a summary. Works under `accelerate launch` unchanged."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    config.validate()
    source = open_source(config.data, config.seed)  # data errors before any model loads
    _check_output(config, resume, overwrite)
    scratch = config.teacher is None  # train the student folder's own transformer on the task loss alone
    if not scratch:
        precheck_folder_teacher(config)

    mixed_precision = _resolve_mixed_precision(config.mixed_precision)
    # Without an accelerator device, tell Accelerate so: it then runs torchrun's processes as MULTI_CPU over gloo
    # (otherwise every process would train alone, each believing it is rank 0).
    no_device = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=no_device)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    set_seed(config.seed)

    pipe = load_pipeline(config.student if scratch else config.teacher)
    family = pipeline_family(pipe)
    teacher = None if scratch else pipe.transformer
    if scratch:
        student_cls = type(pipe.transformer)
    else:
        if check_teacher(config.teacher, type(teacher).__name__) != family:
            raise UserError(f"teacher {config.teacher}: a {type(pipe).__name__} with a {type(teacher).__name__}")
        student_cls = check_student(config.student, family, dict(teacher.config), config.teacher)
    arch = pipe.transformer.config  # the teacher's, or (from scratch) the student's own
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    unit, native = vae_scale * arch.patch_size, arch.sample_size * vae_scale
    for r in config.resolutions:
        if r % unit:
            raise UserError(
                f"unknown resolution {r}: must be a multiple of {unit} "
                f"(VAE downsampling {vae_scale} x patch {arch.patch_size})"
            )
        grid = torch_family(family).max_latent_grid(arch)
        if grid is not None and r // unit > grid:
            raise UserError(
                f"resolution {r} exceeds the transformer's position-embedding grid (at most {grid * unit} px)"
            )
    plan = stage_plan(config, native)

    _prepare_output_folder(accelerator, config, resume, overwrite)
    out = Path(config.out)
    ckpt_root = out / "checkpoints"
    ckpt = latest_checkpoint(ckpt_root) if resume else None

    # Frozen teacher and encoders; the teacher may run in the mixed-precision dtype. The VAE stays fp32 (the SDXL
    # VAE overflows in fp16) and T5 is kept out of fp16 for the same reason.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    text_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    frozen = (
        [(teacher, weight_dtype)] * (not scratch)
        + [(pipe.vae, torch.float32)]
        + [
            (getattr(pipe, n), text_dtype)
            for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
            if getattr(pipe, n, None) is not None
        ]
    )
    for module, dtype in frozen:
        module.requires_grad_(False).eval().to(device)
        if module.dtype != dtype:  # (diffusers warns on any .to(dtype), even a no-op one)
            module.to(dtype)
    encoder = PipelineEncoder(pipe, family, device, text_dtype, config.max_text_tokens, config.cache_mb << 20)

    if scratch:
        student = pipe.transformer.to(device).train()
        teacher_tap = student_tap = FeatureTap([], False)  # no feature loss without a teacher
    else:
        student = student_cls.from_pretrained(config.student, subfolder="transformer").to(device).train()
        teacher_tap = FeatureTap(attention_modules(teacher, family, student.edit), config.feature_prompt)
        student_tap = FeatureTap(attention_modules(student, family, student.edit), config.feature_prompt)
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    objective = Objective(
        family, pipe.scheduler.config, teacher, config, teacher_tap, student_tap, accelerator.autocast, vae_scale
    )
    objective.additional_conditions = bool(getattr(arch, "use_additional_conditions", False))

    sampler = IndexSampler(len(source), config.seed, config.batch_size, world, config.grad_accum)
    _freeze_unused(student, objective, encoder, source, sampler.indices(0, 0, rank), plan[0][1])
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(student, optimizer)
    ema = None
    if config.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        # diffusers' EMA (decay warms up as (1 + n) / (10 + n) up to ema_decay); checkpointed with the optimizer.
        ema = EMAModel(params, decay=config.ema_decay)
        accelerator.register_for_checkpointing(ema)

    @contextlib.contextmanager
    def averaged_weights():
        """The EMA weights in the student for the duration (evaluation, the written pipeline); no-op without EMA."""
        if ema is None:
            yield
            return
        ema.store(params)
        ema.copy_to(params)
        try:
            yield
        finally:
            ema.restore(params)

    def save_hook(models, weights, output_dir):
        # The student goes into the checkpoint in diffusers' layout (transformer/, safetensors) instead of
        # accelerate's anonymous model.safetensors.
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_pretrained(Path(output_dir) / "transformer")
        if weights:
            weights.pop()

    def load_hook(models, input_dir):
        loaded = student_cls.from_pretrained(input_dir, subfolder="transformer")
        accelerator.unwrap_model(models.pop()).load_state_dict(loaded.state_dict())

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    state = {"step": 0, "eval": {}}
    if ckpt is not None:
        # accelerate restores the optimizer (a torch pickle, read only from this run's own checkpoint folder), the
        # grad scaler and every rank's RNG states; the hook restores the student from its safetensors.
        accelerator.load_state(str(ckpt))
        state = _read_json(ckpt / "trainer_state.json")
        state.setdefault("eval", {})
        logger.info("resumed from %s (step %d)", ckpt, state["step"])
    start_step = state["step"]
    if start_step >= config.steps:
        raise UserError(f"nothing to do: the newest checkpoint is at step {start_step} >= --steps {config.steps}")

    csv_path = out / "losses.csv"
    if accelerator.is_main_process:
        rows = [r for r in csv.DictReader(csv_path.open())] if csv_path.exists() and ckpt is not None else []
        with csv_path.open("w", newline="") as f:  # rows past the checkpoint belong to the interrupted run
            writer = csv.DictWriter(f, CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(r for r in rows if int(r["step"]) <= start_step)

    images_per_step = config.batch_size * world * config.grad_accum

    def evaluate() -> dict:
        """Losses on a fixed batch (first items, fixed noise, timesteps spread over the schedule)."""
        n = min(4, len(source))
        res = plan[-1][1]
        x0 = encoder.latents(source, list(range(n)), res)
        text = encoder.text([source.caption(i) for i in range(n)])
        g = seeded(config.seed, 104729)
        u = (torch.arange(n) + 0.5) / n
        noise = torch.randn(x0.shape, generator=g).to(device)
        with torch.no_grad(), accelerator.autocast(), averaged_weights():
            parts = objective.losses(student, x0, text, u, noise)  # the module DDP wraps (no gradient sync)
        return {k: round(float(v), 8) for k, v in parts.items()}

    def save_checkpoint(step: int, stage: int) -> None:
        tmp, final = ckpt_root / f".step-{step}.tmp", ckpt_root / f"step-{step}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state["eval"][str(step)] = evaluate()
            state.update(step=step, stage=stage, resolution=plan[stage][1])
            config.save(tmp / "distill_config.json")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(ckpt_root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[
                : -config.keep_checkpoints
            ]:
                shutil.rmtree(old)
            plot_losses(csv_path, out / "losses.png", plan)
            logger.info("checkpoint %s (eval loss %.5f)", final, state["eval"][str(step)]["loss"])
        accelerator.wait_for_everyone()

    if accelerator.is_main_process and start_step == 0:
        state["eval"]["0"] = evaluate()
        logger.info("eval loss at start %.5f", state["eval"]["0"]["loss"])

    progress = tqdm(
        total=config.steps,
        initial=start_step,
        disable=not accelerator.is_local_main_process,
        desc="distill",
        unit="step",
        dynamic_ncols=True,
    )
    step, t_start, step_times = start_step, time.perf_counter(), []
    model.train()
    with warnings.catch_warnings():
        # EDiT's depthwise convolutions run channels-last, so their (tiny) weight gradients come out channels-last
        # and DDP copies them into its buckets instead of viewing them: harmless, and said once per process.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        while step < config.steps:
            stage, res = stage_at(plan, step)
            t0 = time.perf_counter()
            totals = torch.zeros(4, device=device)
            for micro in range(config.grad_accum):
                positions = sampler.positions(step, micro, rank)
                indices = [sampler.index(c) for c in positions]
                x0 = encoder.latents(source, indices, res)
                # Caption dropout, noise level and noise per sample position: independent of the process count.
                gens = [seeded(config.seed, c, 31) for c in positions]
                drop = [bool(torch.rand(1, generator=g) < config.caption_dropout) for g in gens]
                u = torch.cat([objective.sample_u(1, g) for g in gens])
                noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
                text = encoder.text(["" if d else source.caption(i) for i, d in zip(indices, drop)])
                sync = contextlib.nullcontext() if micro == config.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    parts = objective.losses(model, x0, text, u, noise)
                    accelerator.backward(parts["loss"] / config.grad_accum)
                student_tap.take()  # gradient checkpointing re-runs the hooks during backward
                totals += torch.stack([parts[k].detach() for k in ("loss", *LOSSES)]) / config.grad_accum
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(params)
            step += 1
            totals = accelerator.reduce(totals, reduction="mean").tolist()  # mean over processes
            dt = time.perf_counter() - t0
            step_times.append(dt)
            if accelerator.is_main_process:
                row = dict(
                    zip(("loss", *LOSSES), totals),
                    step=step,
                    stage=stage,
                    resolution=res,
                    lr=lr,
                    sec_per_step=round(dt, 5),
                    sec_per_image=round(dt / images_per_step, 6),
                )
                with csv_path.open("a", newline="") as f:
                    csv.DictWriter(f, CSV_COLUMNS).writerow(row)
                progress.set_postfix(loss=f"{totals[0]:.4f}", res=res)
                if step % config.log_every == 0 or step == config.steps:
                    logger.info(
                        "step %d/%d %dpx loss %.5f (task %.5f output %.5f feature %.5f) %.3f s/step",
                        step,
                        config.steps,
                        res,
                        *totals,
                        dt,
                    )
            progress.update(1)
            if step % config.checkpoint_every == 0 or step == config.steps:
                save_checkpoint(step, stage)
    progress.close()

    # Every rank must end with the same weights: gather each rank's digest and compare.
    digests = gather_object([state_digest(accelerator.unwrap_model(model))])
    summary = {}
    if accelerator.is_main_process:
        if len(set(digests)) != 1:
            raise RuntimeError(f"ranks ended with different weights: {digests}")
        first_eval, last_eval = state["eval"].get("0"), state["eval"][str(step)]
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        timing = {
            "num_processes": world,
            "images_per_step": images_per_step,
            "mixed_precision": mixed_precision,
            "sec_per_step_median": float(np.median(step_times)),
            "sec_per_image_median": float(np.median(step_times)) / images_per_step,
            "wall_s_this_run": time.perf_counter() - t_start,
            "peak_rss_mb_rank0": round(peak_rss_mb, 1),
        }
        if torch.cuda.is_available():
            timing["peak_cuda_mb_rank0"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        state.update(rank_weight_digests=digests, timing=timing)
        (out / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        config.save(out / "distill_config.json")
        with averaged_weights():
            _write_pipeline(
                Path(config.student),
                student,
                out,
                {
                    "teacher": config.teacher,
                    "steps": step,
                    "resolutions": [r for _, r in plan],
                    "ema_decay": config.ema_decay,
                    "eval_loss_start": first_eval and first_eval["loss"],
                    "eval_loss_end": last_eval["loss"],
                },
            )
        summary = {
            "out": str(out),
            "steps": step,
            "eval_start": first_eval,
            "eval_end": last_eval,
            **timing,
            "rank_weight_digests": digests,
        }
        logger.info(
            "wrote %s: eval loss %s -> %.5f", out, first_eval and f"{first_eval['loss']:.5f}", last_eval["loss"]
        )
    teacher_tap.remove()
    student_tap.remove()
    accelerator.wait_for_everyone()
    # Free the DDP wrapper while the process group is still registered. Otherwise its Reducer drops the group's last
    # reference when this frame is cleared, and the group's destructor then joins gloo's worker thread while holding
    # the GIL, which that thread may need to free the tensors of the last collective: a deadlock at exit (seen at
    # random under load). destroy_process_group releases the GIL before it frees the group.
    accelerator.free_memory()
    del model, optimizer
    gc.collect()
    accelerator.end_training()
    return summary
