"""Reproduce the shapes models from scratch with fixed seeds (models/shapes.py, docs/shapes.md).

Stages, each skipped when its output already exists in WORK (so the command resumes after an interruption; the
transformer stages resume exactly from their newest checkpoint):
  vae-pixart, vae-sd3     the two VAEs (SDXL layout with 4 latent channels, SD3 layout with 16)
  pixart, sd3             the untrained teacher pipelines: the trained VAE, a T5 pretrained on the captions (each
                          token learns its word and whose attribute it is), the rest random
  pixart-teacher, sd3-teacher
                          the teachers, trained from scratch by `edit-mobile distill` without --teacher (task loss
                          only): one shape per scene, 32 px (8x8 latents) first, then 64 px; AdamW with warm-up and
                          cosine decay; EMA weights. Checkpoints every 250 steps in WORK/<stage>/checkpoints.
  pixart-edit, sd3-mm-edit
                          the students: `edit-mobile convert` of the trained teacher (WORK/<stage>-converted, also
                          evaluated as "without distillation"), then `edit-mobile distill` from it at 64 px.
  classifier              the attribute classifier that scores prompt accuracy (models/shapes_classifier.py)
  ship                    copies the results into models/assets (what the shapes-* presets load), weights in
                          safetensors; students keep only their transformer (they share the teacher's other parts)

    python scripts/train_shapes.py                      # every stage, in order
    python scripts/train_shapes.py --only vae-pixart    # one stage
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from edit_mobile.models.shapes import (
    TextTrainConfig,
    VAETrainConfig,
    shapes_pixart_pipeline,
    shapes_sd3_pipeline,
    train_text_encoder,
    train_vae,
)

logger = logging.getLogger("train_shapes")


def stage_vae(work: Path, name: str, latent_channels: int) -> None:
    out = work / name
    config = VAETrainConfig(latent_channels=latent_channels)
    vae, losses = train_vae(config)
    tmp = work / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    (tmp / "vae_train.json").write_text(
        json.dumps({**config.to_dict(), "final_loss": sum(losses[-50:]) / 50}, indent=2) + "\n"
    )
    tmp.rename(out)


def stage_pipeline(work: Path, family: str) -> None:
    """The untrained teacher: random transformer, the trained VAE, and its T5 pretrained on the captions (the CLIP
    encoders of SD3 stay random: they carry positions, and MM-DiT's joint attention mixes the prompt's tokens)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(work / f"vae-{family}")
    pipe = (shapes_pixart_pipeline if family == "pixart" else shapes_sd3_pipeline)(vae)
    t5 = "text_encoder" if family == "pixart" else "text_encoder_3"
    config = TextTrainConfig()
    accuracy = train_text_encoder(getattr(pipe, t5), getattr(pipe, t5.replace("text_encoder", "tokenizer")), config)
    tmp = work / f".{family}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    (tmp / t5 / "text_train.json").write_text(json.dumps({**config.to_dict(), **accuracy}, indent=2) + "\n")
    tmp.rename(work / f"{family}-untrained")


# The recipe (docs/shapes.md), identical for both families. Teachers and students share the data, batch, schedule
# shape, EMA, caption dropout, text length and checkpointing; they differ in resolutions, length and learning rate.
TRAINING_ARGS = [
    "--data", "synthetic-single:100000",
    "--batch-size", "32",
    "--lr-schedule", "cosine",
    "--ema-decay", "0.999",
    "--caption-dropout", "0.1",
    "--max-text-tokens", "32",
    "--checkpoint-every", "250",
    "--keep-checkpoints", "1",
]  # fmt: skip
TEACHER_ARGS = [
    *TRAINING_ARGS,
    "--resolution", "32", "64",
    "--stage-steps", "3000", "6000",
    "--steps", "9000",
    "--lr", "1e-3",
    "--warmup-steps", "300",
]  # fmt: skip
STUDENT_ARGS = [*TRAINING_ARGS, "--resolution", "64", "--steps", "3000", "--lr", "3e-4", "--warmup-steps", "100"]


def stage_teacher(work: Path, family: str) -> None:
    """The product's own trainer, resumed from its newest checkpoint when the stage was interrupted."""
    out = work / f"{family}-teacher"
    cmd = [sys.executable, "-m", "edit_mobile.cli", "distill", "--student", str(work / f"{family}-untrained")]
    # min-SNR-5 weighting for PixArt's ε-prediction: without it the high-noise steps, where the layout and colours
    # are decided, are almost free (docs/shapes.md); SD3's flow-matching loss weights them by construction.
    snr = ["--snr-gamma", "5"] if family == "pixart" else []
    cmd += ["--out", str(out), *TEACHER_ARGS, *snr, "--resume"]
    subprocess.run(cmd, check=True)


def stage_student(work: Path, family: str, arch: str) -> None:
    teacher, converted = work / f"{family}-teacher", work / f"{family}-{arch}-converted"
    cli = [sys.executable, "-m", "edit_mobile.cli"]
    if not (converted / "model_index.json").exists():
        shutil.rmtree(converted, ignore_errors=True)
        subprocess.run([*cli, "convert", str(teacher), "--arch", arch, "--out", str(converted)], check=True)
    out = work / f"{family}-{arch}"
    cmd = [*cli, "distill", "--teacher", str(teacher), "--student", str(converted), "--out", str(out)]
    subprocess.run([*cmd, *STUDENT_ARGS, "--resume"], check=True)


def stage_classifier(work: Path) -> None:
    from edit_mobile.models.shapes_classifier import train_classifier

    tmp = work / ".classifier.tmp"
    train_classifier(tmp, seed=0)
    tmp.rename(work / "classifier")


def copy_fp16(src: Path, dst: Path) -> None:
    """Copy a model folder with its safetensors weights stored in fp16 (half the bytes; diffusers and transformers
    load them into fp32 models, so the shipped model is the fp16-rounded one, and it is what `evaluate` scores)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    for path in dst.glob("*.safetensors"):
        weights = load_file(path)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, path, {"format": "pt"})


def stage_ship(work: Path) -> None:
    """models/assets/shapes/{shapes-pixart, shapes-sd3} whole pipelines; shapes-*-edit the student transformers;
    weights in fp16 (the four pipelines fit the repository's 20 MB)."""
    assets = Path(__file__).resolve().parents[1] / "models" / "assets"
    tmp = assets / ".shapes.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for family, arch in (("pixart", "edit"), ("sd3", "mm-edit")):
        teacher, student = work / f"{family}-teacher", work / f"{family}-{arch}"
        if not (teacher / "model_index.json").exists():
            continue
        names = [p.name for p in teacher.iterdir() if p.is_dir() and p.name != "checkpoints"]
        for name in names:
            copy_fp16(teacher / name, tmp / f"shapes-{family}" / name)
        for name in ("model_index.json", "edit_mobile.json"):
            if (teacher / name).exists():
                shutil.copy2(teacher / name, tmp / f"shapes-{family}" / name)
        if (student / "model_index.json").exists():
            copy_fp16(student / "transformer", tmp / f"shapes-{family}-{arch}" / "transformer")
            shutil.copy2(student / "edit_mobile.json", tmp / f"shapes-{family}-{arch}" / "edit_mobile.json")
    shutil.rmtree(assets / "shapes", ignore_errors=True)
    tmp.rename(assets / "shapes")
    if (work / "classifier").is_dir():  # a retrained classifier (the shipped one otherwise stays)
        for name in ("shapes_classifier.onnx", "shapes_classifier.json"):
            shutil.copy2(work / "classifier" / name, assets / name)


STAGES = {
    "vae-pixart": (lambda w: stage_vae(w, "vae-pixart", 4), "vae-pixart"),
    "vae-sd3": (lambda w: stage_vae(w, "vae-sd3", 16), "vae-sd3"),
    "pixart": (lambda w: stage_pipeline(w, "pixart"), "pixart-untrained"),
    "sd3": (lambda w: stage_pipeline(w, "sd3"), "sd3-untrained"),
    "pixart-teacher": (lambda w: stage_teacher(w, "pixart"), "pixart-teacher/model_index.json"),
    "sd3-teacher": (lambda w: stage_teacher(w, "sd3"), "sd3-teacher/model_index.json"),
    "pixart-edit": (lambda w: stage_student(w, "pixart", "edit"), "pixart-edit/model_index.json"),
    "sd3-mm-edit": (lambda w: stage_student(w, "sd3", "mm-edit"), "sd3-mm-edit/model_index.json"),
    "classifier": (stage_classifier, "classifier"),
    "ship": (stage_ship, None),  # always runs: the copy is cheap
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("shapes-work"), help="working folder (default shapes-work)")
    parser.add_argument("--only", nargs="+", choices=list(STAGES), help="run only these stages")
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch threads (fewer when sharing the CPU)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the trainer subprocesses use as many
    args.work.mkdir(parents=True, exist_ok=True)
    for name, (run, output) in STAGES.items():
        if args.only and name not in args.only:
            continue
        if output and (args.work / output).exists():
            logger.info("%s: %s exists, skipped", name, args.work / output)
            continue
        logger.info("%s: running", name)
        run(args.work)


if __name__ == "__main__":
    main()
