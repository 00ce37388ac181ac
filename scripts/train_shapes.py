"""Reproduce the shapes models from scratch with fixed seeds (models/shapes.py, docs/shapes.md).

Stages, each skipped when its output already exists in WORK (so the command resumes after an interruption; the
transformer stages resume exactly from their newest checkpoint):
  vae-pixart, vae-sd3     the two VAEs (SDXL layout with 4 latent channels, SD3 layout with 16)
  pixart, sd3             the untrained teacher pipelines (random text encoders, the trained VAE)
  pixart-teacher, sd3-teacher
                          the teachers, trained from scratch by `edit-mobile distill` without --teacher (task loss
                          only): one shape per scene, 32 px (8x8 latents) first, then 64 px; AdamW with warm-up and
                          cosine decay; EMA weights. Checkpoints every 250 steps in WORK/<stage>/checkpoints.

    python scripts/train_shapes.py                      # every stage, in order
    python scripts/train_shapes.py --only vae-pixart    # one stage
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from edit_mobile.models.shapes import VAETrainConfig, shapes_pixart_pipeline, shapes_sd3_pipeline, train_vae

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
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(work / f"vae-{family}")
    pipe = (shapes_pixart_pipeline if family == "pixart" else shapes_sd3_pipeline)(vae)
    tmp = work / f".{family}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(work / f"{family}-untrained")


# The teachers' recipe (docs/shapes.md): identical for both families.
TEACHER_ARGS = [
    "--data", "synthetic-single:100000",
    "--resolution", "32", "64",
    "--stage-steps", "3000", "6000",
    "--steps", "9000",
    "--batch-size", "32",
    "--lr", "1e-3",
    "--warmup-steps", "300",
    "--lr-schedule", "cosine",
    "--ema-decay", "0.999",
    "--caption-dropout", "0.1",
    "--max-text-tokens", "16",
    "--checkpoint-every", "250",
    "--keep-checkpoints", "1",
]  # fmt: skip


def stage_teacher(work: Path, family: str) -> None:
    """The product's own trainer, resumed from its newest checkpoint when the stage was interrupted."""
    out = work / f"{family}-teacher"
    cmd = [sys.executable, "-m", "edit_mobile.cli", "distill", "--student", str(work / f"{family}-untrained")]
    cmd += ["--out", str(out), *TEACHER_ARGS, "--resume"]
    subprocess.run(cmd, check=True)


STAGES = {
    "vae-pixart": (lambda w: stage_vae(w, "vae-pixart", 4), "vae-pixart"),
    "vae-sd3": (lambda w: stage_vae(w, "vae-sd3", 16), "vae-sd3"),
    "pixart": (lambda w: stage_pipeline(w, "pixart"), "pixart-untrained"),
    "sd3": (lambda w: stage_pipeline(w, "sd3"), "sd3-untrained"),
    "pixart-teacher": (lambda w: stage_teacher(w, "pixart"), "pixart-teacher/model_index.json"),
    "sd3-teacher": (lambda w: stage_teacher(w, "sd3"), "sd3-teacher/model_index.json"),
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
    args.work.mkdir(parents=True, exist_ok=True)
    for name, (run, output) in STAGES.items():
        if args.only and name not in args.only:
            continue
        if (args.work / output).exists():
            logger.info("%s: %s exists, skipped", name, args.work / output)
            continue
        logger.info("%s: running", name)
        run(args.work)


if __name__ == "__main__":
    main()
