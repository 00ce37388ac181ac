"""The distillation objective (models/distill.py): the family's noise process, the teacher and student calls,
the three losses, the fixed-batch evaluation, and the feature taps on the attention layers EDiT replaces.

    loss = w_task    * task loss     (PixArt-Σ: ε-prediction MSE; SD3: rectified-flow velocity MSE)
         + w_output  * output loss   (student vs frozen teacher prediction, same noisy input and timestep)
         + w_feature * feature loss  (each block's self-attention output vs the teacher's, mean over layers)
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import torch
import torch.nn.functional as F

from ..runtime.errors import UserError
from .distill_config import LOSSES, DistillConfig
from .families import torch_family

logger = logging.getLogger(__name__)


def seeded(*numbers: int) -> torch.Generator:
    """A CPU generator seeded with a hash of the given numbers (seed, sample position, ...): no hidden RNG state."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(numbers)).generate_state(1)[0]))


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
        if config.snr_gamma is not None and self.noise.prediction != "epsilon":
            raise UserError(
                f"--snr-gamma weights an ε-prediction loss; this family's is {self.noise.prediction} (flow "
                "matching, whose logit-normal timesteps already weight the noise levels)"
            )
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
        if self.config.snr_gamma is None:
            parts = {"task": F.mse_loss(out[:, :c], target.float())}  # PixArt: ε channels only (not the variance)
        else:
            per_sample = (out[:, :c] - target.float()).square().mean(dim=(1, 2, 3))
            parts = {"task": (self.noise.snr_weights(timestep, self.config.snr_gamma) * per_sample).mean()}
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

    def evaluate(self, student, encoder, source, resolution: int, seed: int) -> dict[str, float]:
        """Losses on a fixed batch (first items, fixed noise, timesteps spread over the schedule)."""
        n = min(4, len(source))
        x0 = encoder.latents(source, list(range(n)), resolution)
        text = encoder.text([source.caption(i) for i in range(n)])
        g = seeded(seed, 104729)
        u = (torch.arange(n) + 0.5) / n
        noise = torch.randn(x0.shape, generator=g).to(x0.device)
        with torch.no_grad(), self.autocast():
            parts = self.losses(student, x0, text, u, noise)
        return {k: round(float(v), 8) for k, v in parts.items()}


def freeze_unused(student, objective: Objective, encoder, source, indices, resolution) -> None:
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
