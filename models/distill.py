"""Distil an EDiT / MM-EDiT student from its teacher (docs/method.md, "convert, then distill"), or train a
pipeline's own transformer from scratch, on 🤗 Accelerate. The parts: the run's config (models/distill_config.py),
the objective (models/distill_objective.py: noise process, the task / output / feature losses), the run folder and
its checkpoints (models/distill_checkpoint.py), and here the set-up and the training loop.

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
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..runtime.errors import UserError
from .convert import load_pipeline, pipeline_family
from .data import PipelineEncoder, open_source
from .distill_checkpoint import (
    Checkpoints,
    check_output,
    prepare_output_folder,
    read_json,
    state_digest,
    write_pipeline,
)
from .distill_config import LOSSES, DistillConfig, differing_keys, stage_at, stage_plan
from .distill_objective import FeatureTap, Objective, freeze_unused, seeded
from .families import STUDENT_CLASSES, TEACHER_CLASSES, torch_family
from .presets import PRESETS

logger = logging.getLogger(__name__)


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
    teacher_config = read_json(path / "transformer" / "config.json")
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
    config = read_json(path / "transformer" / "config.json")
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
    diffs = [f"{k} {config.get(k)!r} vs teacher {teacher_config[k]!r}" for k in differing_keys(config, teacher_config)]
    if diffs:
        raise UserError(f"student {student_dir} does not match the teacher's transformer: {'; '.join(diffs[:3])}")
    return torch_family(family).student


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


def _resolve_mixed_precision(mode: str) -> str:
    if mode != "auto":
        return mode
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _resolution_plan(config: DistillConfig, family: str, vae, arch) -> tuple[list[tuple[int, int]], int]:
    """The progressive stages [(first step, resolution), ...] after checking every resolution fits the model;
    also returns the VAE's downsampling factor."""
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    unit, native = vae_scale * arch.patch_size, arch.sample_size * vae_scale
    grid = torch_family(family).max_latent_grid(arch)
    for r in config.resolutions:
        if r % unit:
            raise UserError(
                f"unknown resolution {r}: must be a multiple of {unit} "
                f"(VAE downsampling {vae_scale} x patch {arch.patch_size})"
            )
        if grid is not None and r // unit > grid:
            raise UserError(
                f"resolution {r} exceeds the transformer's position-embedding grid (at most {grid * unit} px)"
            )
    return stage_plan(config, native), vae_scale


def _freeze_pipeline(pipe, teacher, device, mixed_precision: str) -> torch.dtype:
    """Frozen teacher and encoders on the device; the teacher may run in the mixed-precision dtype. The VAE stays
    fp32 (the SDXL VAE overflows in fp16) and T5 is kept out of fp16 for the same reason. Returns the text dtype."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    text_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
    frozen = (
        [(teacher, weight_dtype)] * (teacher is not None)
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
    return text_dtype


@contextlib.contextmanager
def _averaged_weights(ema, params):
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


def distill(config: DistillConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run (or resume) a distillation; returns a summary. Works under `accelerate launch` unchanged."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed
    from tqdm.auto import tqdm

    config.validate()
    source = open_source(config.data, config.seed)  # data errors before any model loads
    check_output(config, resume, overwrite)
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
    plan, vae_scale = _resolution_plan(config, family, pipe.vae, arch)

    prepare_output_folder(accelerator, config, resume, overwrite)
    out = Path(config.out)
    text_dtype = _freeze_pipeline(pipe, teacher, device, mixed_precision)
    encoder = PipelineEncoder(pipe, family, device, text_dtype, config.max_text_tokens, config.cache_mb << 20)

    if scratch:
        student = pipe.transformer.to(device).train()
        teacher_tap = student_tap = FeatureTap([], False)  # no feature loss without a teacher
    else:
        student = student_cls.from_pretrained(config.student, subfolder="transformer").to(device).train()
        layers = torch_family(family).attention_modules
        teacher_tap = FeatureTap(layers(teacher, student.edit), config.feature_prompt)
        student_tap = FeatureTap(layers(student, student.edit), config.feature_prompt)
    if config.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    objective = Objective(
        family, pipe.scheduler.config, teacher, config, teacher_tap, student_tap, accelerator.autocast, vae_scale
    )
    objective.additional_conditions = bool(getattr(arch, "use_additional_conditions", False))

    sampler = IndexSampler(len(source), config.seed, config.batch_size, world, config.grad_accum)
    freeze_unused(student, objective, encoder, source, sampler.indices(0, 0, rank), plan[0][1])
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(student, optimizer)
    ema = None
    if config.ema_decay > 0:
        from diffusers.training_utils import EMAModel

        # diffusers' EMA (decay warms up as (1 + n) / (10 + n) up to ema_decay); checkpointed with the optimizer.
        ema = EMAModel(params, decay=config.ema_decay)
        accelerator.register_for_checkpointing(ema)

    checkpoints = Checkpoints(accelerator, config, student_cls, plan)
    state = checkpoints.restore(resume)
    start_step = state["step"]
    images_per_step = config.batch_size * world * config.grad_accum

    def evaluate() -> dict:  # on the module DDP wraps (no gradient sync), with the EMA weights
        with _averaged_weights(ema, params):
            return objective.evaluate(student, encoder, source, plan[-1][1], config.seed)

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
                checkpoints.log_losses(
                    dict(
                        zip(("loss", *LOSSES), totals),
                        step=step,
                        stage=stage,
                        resolution=res,
                        lr=lr,
                        sec_per_step=round(dt, 5),
                        sec_per_image=round(dt / images_per_step, 6),
                    )
                )
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
                checkpoints.save(state, step, stage, evaluate)
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
        with _averaged_weights(ema, params):
            write_pipeline(
                Path(config.student),
                student,
                out,
                {
                    "teacher": config.teacher,
                    "steps": step,
                    "resolutions": [r for _, r in plan],
                    "ema_decay": config.ema_decay,
                    "max_text_tokens": config.max_text_tokens,
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
