"""A distillation run's folder (models/distill.py): checked before any model loads, created by the main process,
checkpointed every N steps (resumable bit for bit), its loss log, and the pipeline written at the end.

    OUT/distill_config.json, trainer_state.json, losses.csv, losses.png    the run
    OUT/checkpoints/step-N/          transformer/ (safetensors), optimizer, RNG states, EMA, distill_config.json,
                                     trainer_state.json
    OUT/model_index.json, transformer/, text_encoder/, vae/, ...           the trained pipeline (diffusers layout)
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from ..runtime.errors import UserError
from .distill_config import LOSSES, RESUME_MAY_CHANGE, DistillConfig, differing_keys

logger = logging.getLogger(__name__)

CSV_COLUMNS = ["step", "stage", "resolution", "loss", *LOSSES, "lr", "sec_per_step", "sec_per_image"]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


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


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK | os.X_OK)


def check_output(config: DistillConfig, resume: bool, overwrite: bool) -> None:
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
        new = config.to_dict()
        diffs = [f"{k} {saved.get(k)!r} -> {new[k]!r}" for k in differing_keys(saved, new, RESUME_MAY_CHANGE)]
        if diffs:
            raise UserError(f"cannot resume {out} with different settings: {'; '.join(diffs[:3])}")


def prepare_output_folder(accelerator, config: DistillConfig, resume: bool, overwrite: bool) -> None:
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


def write_pipeline(student_dir: Path, transformer, out: Path, info: dict) -> None:
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
        meta = read_json(student_dir / "edit_mobile.json")
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


class Checkpoints:
    """OUT/checkpoints/step-N through accelerate's save_state / load_state (optimizer, grad scaler, every rank's RNG
    states and whatever is registered for checkpointing, such as the EMA), with the student in diffusers' layout
    (transformer/, safetensors) instead of accelerate's anonymous model.safetensors. A checkpoint is written to a
    temporary folder and renamed; the newest `keep_checkpoints` are kept."""

    def __init__(self, accelerator, config: DistillConfig, student_cls, plan):
        self.accelerator, self.config, self.student_cls, self.plan = accelerator, config, student_cls, plan
        self.out = Path(config.out)
        self.root = self.out / "checkpoints"
        self.loss_csv = self.out / "losses.csv"
        accelerator.register_save_state_pre_hook(self._save_student)
        accelerator.register_load_state_pre_hook(self._load_student)

    def _save_student(self, models, weights, output_dir):
        if self.accelerator.is_main_process:
            self.accelerator.unwrap_model(models[0]).save_pretrained(Path(output_dir) / "transformer")
        if weights:
            weights.pop()

    def _load_student(self, models, input_dir):
        loaded = self.student_cls.from_pretrained(input_dir, subfolder="transformer")
        self.accelerator.unwrap_model(models.pop()).load_state_dict(loaded.state_dict())

    def restore(self, resume: bool) -> dict:
        """The trainer state ({"step", "eval", ...}) of the newest checkpoint, restored, when resuming; else a fresh
        one. The loss log keeps only the rows up to that step (later ones belong to the interrupted run)."""
        ckpt = latest_checkpoint(self.root) if resume else None
        state = {"step": 0, "eval": {}}
        if ckpt is not None:
            # The optimizer is a torch pickle, read only from this run's own checkpoint folder; the load hook
            # restores the student from its safetensors.
            self.accelerator.load_state(str(ckpt))
            state = read_json(ckpt / "trainer_state.json")
            state.setdefault("eval", {})
            logger.info("resumed from %s (step %d)", ckpt, state["step"])
        if state["step"] >= self.config.steps:
            raise UserError(
                f"nothing to do: the newest checkpoint is at step {state['step']} >= --steps {self.config.steps}"
            )
        if self.accelerator.is_main_process:
            rows = list(csv.DictReader(self.loss_csv.open())) if self.loss_csv.exists() and ckpt is not None else []
            with self.loss_csv.open("w", newline="") as f:
                writer = csv.DictWriter(f, CSV_COLUMNS, lineterminator="\n")  # Unix lines: clean diffs in git
                writer.writeheader()
                writer.writerows(r for r in rows if int(r["step"]) <= state["step"])
        return state

    def log_losses(self, row: dict) -> None:
        with self.loss_csv.open("a", newline="") as f:
            csv.DictWriter(f, CSV_COLUMNS, lineterminator="\n").writerow(row)

    def save(self, state: dict, step: int, stage: int, evaluate) -> None:
        """Checkpoint step `step` on every rank; the main process adds `evaluate()` to state["eval"]."""
        accelerator = self.accelerator
        tmp, final = self.root / f".step-{step}.tmp", self.root / f"step-{step}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state["eval"][str(step)] = evaluate()
            state.update(step=step, stage=stage, resolution=self.plan[stage][1])
            self.config.save(tmp / "distill_config.json")
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            steps = sorted(self.root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in steps[: -self.config.keep_checkpoints]:
                shutil.rmtree(old)
            plot_losses(self.loss_csv, self.out / "losses.png", self.plan)
            logger.info("checkpoint %s (eval loss %.5f)", final, state["eval"][str(step)]["loss"])
        accelerator.wait_for_everyone()
