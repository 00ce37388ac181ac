"""Distil a converted EDiT / MM-EDiT student from its teacher (task + output + feature distillation losses).

--teacher is the original PixArt-Σ / SD3 pipeline (preset or folder), --student the folder `edit-mobile convert`
wrote from it. --data is a folder of images with same-stem .txt captions, or `synthetic[:N]` (generated shapes).
--resolution takes one or more sizes: progressive stages (e.g. 512 1024), the steps split evenly unless
--stage-steps says otherwise. OUT holds the run (distill_config.json, losses.csv, losses.png, checkpoints/) and,
when training ends, the distilled pipeline (diffusers layout) for `edit-mobile export OUT ...`.
Built on 🤗 Accelerate: the same command runs data-parallel on K GPUs under `accelerate launch --multi_gpu
--num_processes K -m edit_mobile.cli distill ...`, or on GPUs or CPUs under `torchrun --nproc_per_node K
-m edit_mobile.cli distill ...` (--batch-size is per process). See docs/distillation.md.

example:
  edit-mobile convert tiny-pixart --arch edit --out tiny-edit
  edit-mobile distill --teacher tiny-pixart --student tiny-edit --out tiny-edit-distilled --steps 20 --resolution 64
"""

from __future__ import annotations

HELP = "distil an EDiT / MM-EDiT student from its teacher (Accelerate: one or many processes / GPUs)"


def build_parser(parser):
    from ..runtime.families import describe

    parser.add_argument(
        "--teacher",
        metavar="SRC",
        help="teacher: preset or diffusers pipeline folder; without it, STUDENT's transformer is trained from its "
        "current weights on the task loss alone (how the shapes teachers are trained from scratch)",
    )
    parser.add_argument(
        "--student",
        required=True,
        metavar="DIR",
        help="converted pipeline folder (edit-mobile convert); without --teacher, any pipeline folder",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="run and output folder")
    parser.add_argument(
        "--data",
        default="synthetic",
        metavar="FOLDER|synthetic[:N]",
        help="images with same-stem .txt captions, or 'synthetic' (default; 1024 items, or N)",
    )
    parser.add_argument(
        "--resolution",
        nargs="+",
        default=[],
        metavar="R",
        help="image size(s) in pixels, one per progressive stage (default: the teacher's native)",
    )
    parser.add_argument(
        "--stage-steps",
        nargs="+",
        type=int,
        default=[],
        metavar="N",
        help="optimizer steps per stage (default: --steps split evenly)",
    )
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps in total (default 1000)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per process per micro-step (default 4)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation micro-steps (default 1)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear learning-rate warm-up steps")
    parser.add_argument(
        "--lr-schedule",
        default="constant",
        choices=["constant", "cosine"],
        help="after warm-up: constant (default) or cosine decay to 0 at --steps",
    )
    parser.add_argument(
        "--ema-decay",
        type=float,
        default=0.0,
        help="keep an exponential moving average of the weights (e.g. 0.999) and write it (default 0: off)",
    )
    parser.add_argument(
        "--loss-weights",
        default=None,
        metavar="task=W,output=W,feature=W",
        help="loss weights (names left out stay 1; default all 1, or task alone without --teacher)",
    )
    parser.add_argument(
        "--feature-prompt", action="store_true", help="SD3: also distil the prompt rows of each joint attention"
    )
    parser.add_argument(
        "--max-text-tokens",
        type=int,
        default=None,
        metavar="T",
        help=f"T5 tokens per caption (default: the pipeline's, {describe(lambda f: f.default_text_tokens, ' / ')})",
    )
    parser.add_argument("--caption-dropout", type=float, default=0.1, help="fraction of empty captions (default 0.1)")
    parser.add_argument(
        "--snr-gamma",
        type=float,
        default=None,
        metavar="G",
        help="min-SNR-G weighting of the task loss (PixArt-Σ's ε-prediction; 5 is the usual choice): weight "
        "min(SNR, G) / SNR per sample, so that the high-noise steps count more (default: uniform)",
    )
    parser.add_argument(
        "--mixed-precision",
        default="auto",
        choices=["auto", "no", "fp16", "bf16"],
        help="auto: bf16 (or fp16) on GPUs, no on CPU",
    )
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints (default 500)")
    parser.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in OUT from its newest checkpoint (starts it if OUT does not exist)",
    )
    parser.add_argument("--overwrite", action="store_true", help="delete an existing OUT and start over")
    return parser


def main(args) -> int:
    import sys
    from pathlib import Path

    from ..models.distill import distill
    from ..models.distill_config import DistillConfig, parse_loss_weights, parse_resolutions

    def absolute(p):  # folders are recorded as absolute paths, so that --resume from elsewhere compares equal
        return str(Path(p).resolve()) if Path(p).exists() else p

    config = DistillConfig(
        teacher=args.teacher and absolute(args.teacher),
        student=absolute(args.student),
        out=args.out,
        data=absolute(args.data),
        resolutions=parse_resolutions(args.resolution),
        stage_steps=args.stage_steps,
        steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        lr_schedule=args.lr_schedule,
        ema_decay=args.ema_decay,
        loss_weights=parse_loss_weights(
            args.loss_weights or ("task=1" if args.teacher else "task=1,output=0,feature=0")
        ),
        feature_prompt=args.feature_prompt,
        caption_dropout=args.caption_dropout,
        snr_gamma=args.snr_gamma,
        max_text_tokens=args.max_text_tokens,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        seed=args.seed,
    )
    try:
        summary = distill(config, resume=args.resume, overwrite=args.overwrite)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: continue from the newest checkpoint in {args.out} by re-running with --resume",
            file=sys.stderr,
        )
        return 130
    if summary:  # the main process
        start, end = summary["eval_start"], summary["eval_end"]
        loss = (f"{start['loss']:.5f} -> " if start else "") + f"{end['loss']:.5f}"
        print(f"wrote {summary['out']}: {summary['steps']} steps, eval loss {loss}")
    return 0
