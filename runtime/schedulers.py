"""numpy twins of the diffusers schedulers the exported pipelines use (no torch: this is the on-device runtime).

Each class reproduces its diffusers counterpart step by step, including float32 rounding:
    DPMSolverMultistepScheduler     PixArt-Σ's default (dpmsolver++, order 2, midpoint)
    FlowMatchEulerDiscreteScheduler SD3 / SD3.5 (static shift)
    DDIMScheduler                   deterministic DDIM (eta = 0)

Build one from a diffusers `scheduler/scheduler_config.json` with `scheduler_from_config(config)`.
Latents are float32 throughout: model outputs of another dtype are upcast, and `step` returns float32.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np

from .errors import UserError

logger = logging.getLogger(__name__)

_F32 = np.float32
_F64 = np.float64


# ---------------------------------------------------------------------------------------------------------------
# float32 helpers that round exactly like torch's CPU kernels
# ---------------------------------------------------------------------------------------------------------------


def _f32_log(x: np.float32) -> np.float32:
    """Correctly rounded float32 log of a scalar.

    torch's float32 log/exp (SLEEF) and sqrt (MKL) are within 1 ulp of correctly rounded; rounding the
    double result agrees with torch far more often than numpy's own float32 SIMD log/exp do, and the rare
    1-ulp coefficient differences left cost at most a few 1e-7 on the latents.
    """
    return _F32(math.log(float(x))) if x > 0 else _F32(-np.inf)


def _f32_exp(x: np.float32) -> np.float32:
    """Correctly rounded float32 exp of a scalar (see _f32_log); exp(-inf) = 0 at the final sigma 0."""
    try:
        return _F32(math.exp(float(x)))
    except OverflowError:
        return _F32(np.inf)


def _round_sum_to_f32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Round the exact sum a + b (float64 inputs) once to float32, as a float32 fused multiply-add does.

    Rounding the float64 sum to float32 is a double rounding; it is wrong only when the float64 sum lands
    exactly on a float32 midpoint, which the TwoSum error term detects and resolves.
    """
    s = a + b
    bb = s - a
    err = (a - (s - bb)) + (b - bb)  # a + b == s + err exactly
    r = s.astype(_F32)
    r64 = r.astype(_F64)
    other = np.nextafter(r, np.where(s > r64, _F32(np.inf), _F32(-np.inf))).astype(_F64)
    tie = (s != r64) & (np.abs(s - r64) == np.abs(other - r64) / 2)
    lo, hi = np.minimum(r64, other), np.maximum(r64, other)
    fixed = np.where(tie & (err > 0), hi, np.where(tie & (err < 0), lo, r64))
    return fixed.astype(_F32)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps, dtype=torch.float32)` bit for bit (CPU, AVX2/AVX-512/ARM builds).

    torch computes start + step*i for the first half and end - step*(steps-1-i) for the second, in float32
    with fused multiply-adds. np.linspace(...).astype(float32) differs by 1 ulp in ~20 % of the betas, which
    moves alphas_cumprod by up to 2e-6 relative: enough to miss 1e-6 latent parity.
    """
    if steps == 1:
        return np.array([start], dtype=_F32)
    s, e = _F32(start), _F32(end)
    step = (e - s) / _F32(steps - 1)
    i = np.arange(steps, dtype=_F64)
    first = i < steps // 2
    base = np.where(first, _F64(s), _F64(e))
    prod = np.where(first, _F64(step) * i, -_F64(step) * (steps - 1 - i))  # exact: 24-bit × ≤31-bit
    return _round_sum_to_f32(base, prod)


def _betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Any,
) -> np.ndarray:
    """float32 betas as diffusers builds them (DDPM-family schedulers)."""
    if trained_betas is not None:
        return np.asarray(trained_betas, dtype=_F32)
    if beta_schedule == "linear":
        return _torch_linspace_f32(beta_start, beta_end, num_train_timesteps)
    if beta_schedule == "scaled_linear":
        lin = _torch_linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps)
        return lin * lin
    if beta_schedule == "squaredcos_cap_v2":
        # diffusers' betas_for_alpha_bar: Python floats, then one cast to float32.
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return np.asarray(betas, dtype=_F32)
    raise ValueError(f"beta_schedule={beta_schedule!r} is not supported (linear, scaled_linear, squaredcos_cap_v2)")


def _alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    # torch.cumprod on CPU accumulates float32 in float64 and rounds each output once.
    alphas = _F32(1.0) - betas
    return np.cumprod(alphas.astype(_F64)).astype(_F32)


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=_F32)


# ---------------------------------------------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------------------------------------------


class Scheduler:
    """Common interface: `set_timesteps(n)`, `.timesteps`, `.init_noise_sigma`, `scale_model_input`, `step`."""

    # diffusers config keys this class reads (constructor arguments).
    _supported: tuple[str, ...] = ()
    # diffusers config keys only supported at one value: {key: required value}.
    _fixed: Mapping[str, Any] = MappingProxyType({})
    # diffusers config keys with no effect on the supported math (read by disabled features).
    _harmless: tuple[str, ...] = ()

    init_noise_sigma: float = 1.0
    timesteps: np.ndarray
    num_inference_steps: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Scheduler:
        """Build from a diffusers scheduler_config.json dict; raise ValueError naming an unsupported field."""
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in cls._supported:
                kwargs[key] = value
            elif key in cls._fixed:
                if value != cls._fixed[key]:
                    raise ValueError(
                        f"{cls.__name__}: config field {key}={value!r} is not supported (only {cls._fixed[key]!r})"
                    )
            elif key not in cls._harmless:
                logger.warning("%s: ignoring unknown config field %s=%r", cls.__name__, key, value)
        return cls(**kwargs)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Set `.timesteps` for `num_inference_steps` steps and reset any multistep state."""
        raise NotImplementedError

    def scale_model_input(self, sample: np.ndarray, t: Any = None) -> np.ndarray:
        """Identity for these schedulers (kept so the generation loop is scheduler-agnostic)."""
        return sample

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray) -> np.ndarray:
        """Advance `sample` from timestep `t` (a value of `.timesteps`) given the model output; float32 out."""
        raise NotImplementedError

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps() before step()")

    def _first_index(self, t: Any) -> int:
        """diffusers' index_for_timestep: the second match when t repeats (img2img), else the first."""
        matches = np.flatnonzero(self.timesteps == t)
        if len(matches) == 0:
            raise ValueError(f"{type(self).__name__}: timestep {t!r} is not in the schedule")
        return int(matches[1] if len(matches) > 1 else matches[0])


def _check_choice(cls_name: str, field: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{cls_name}: config field {field}={value!r} is not supported (one of {allowed})")


# ---------------------------------------------------------------------------------------------------------------
# DPM-Solver++ multistep
# ---------------------------------------------------------------------------------------------------------------


class DPMSolverMultistepScheduler(Scheduler):
    """diffusers.DPMSolverMultistepScheduler for algorithm_type="dpmsolver++", solver_order 1 or 2."""

    _supported = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "solver_order",
        "prediction_type",
        "algorithm_type",
        "solver_type",
        "lower_order_final",
        "euler_at_final",
        "final_sigmas_type",
        "lambda_min_clipped",
        "timestep_spacing",
        "steps_offset",
    )
    _fixed = MappingProxyType(
        {
            "thresholding": False,
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "use_lu_lambdas": False,
            "use_flow_sigmas": False,
            "variance_type": None,
            "rescale_betas_zero_snr": False,
            "use_dynamic_shifting": False,
        }
    )
    _harmless = ("dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type")

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -math.inf,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
    ) -> None:
        name = type(self).__name__
        _check_choice(name, "solver_order", solver_order, (1, 2))
        _check_choice(name, "prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
        # diffusers silently maps the legacy "deis" to dpmsolver++.
        _check_choice(name, "algorithm_type", algorithm_type, ("dpmsolver++", "deis"))
        # diffusers maps the UniPC/DEIS solver types to midpoint.
        _check_choice(name, "solver_type", solver_type, ("midpoint", "heun", "logrho", "bh1", "bh2"))
        _check_choice(name, "final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        _check_choice(name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        self.num_train_timesteps = int(num_train_timesteps)
        self.solver_order = int(solver_order)
        self.prediction_type = prediction_type
        self.solver_type = "heun" if solver_type == "heun" else "midpoint"
        self.lower_order_final = bool(lower_order_final)
        self.euler_at_final = bool(euler_at_final)
        self.final_sigmas_type = final_sigmas_type
        self.lambda_min_clipped = float(lambda_min_clipped)
        self.timestep_spacing = timestep_spacing
        self.steps_offset = int(steps_offset)

        betas = _betas(self.num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas_cumprod = _alphas_cumprod(betas)
        with np.errstate(divide="ignore"):
            alpha_t = np.sqrt(self.alphas_cumprod)
            sigma_t = np.sqrt(_F32(1.0) - self.alphas_cumprod)
            self._lambda_t = np.log(alpha_t) - np.log(sigma_t)  # only used for lambda_min_clipped
        self.timesteps = np.arange(self.num_train_timesteps - 1, -1, -1, dtype=np.int64)
        self.sigmas = np.sqrt((_F32(1.0) - self.alphas_cumprod) / self.alphas_cumprod)
        self._reset()

    def _reset(self) -> None:
        self._model_outputs: list[np.ndarray | None] = [None] * self.solver_order
        self._lower_order_nums = 0
        self._step_index: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Integer timesteps (int64) and float32 sigmas with a final sigma appended; resets the solver history."""
        n = int(num_inference_steps)
        clipped_idx = int(np.searchsorted(self._lambda_t[::-1], self.lambda_min_clipped, side="left"))
        last_timestep = self.num_train_timesteps - clipped_idx
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            step_ratio = last_timestep // (n + 1)
            timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += self.steps_offset
        else:  # trailing
            step_ratio = self.num_train_timesteps / n
            timesteps = np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64)
            timesteps -= 1

        train_sigmas = np.sqrt((_F32(1.0) - self.alphas_cumprod) / self.alphas_cumprod)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        if self.final_sigmas_type == "sigma_min":
            a0 = self.alphas_cumprod[0]
            sigma_last: float = np.sqrt((_F32(1.0) - a0) / a0)
        else:
            sigma_last = 0.0
        self.sigmas = np.concatenate([sigmas, [sigma_last]]).astype(_F32)
        self.timesteps = timesteps
        self.num_inference_steps = len(timesteps)
        self._reset()

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        alpha_t = _F32(1.0) / np.sqrt(sigma * sigma + _F32(1.0))
        return alpha_t, sigma * alpha_t

    def _convert_model_output(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """Model output → predicted x0 (dpmsolver++ works on the data prediction)."""
        if self.prediction_type == "sample":
            return model_output
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[self._step_index])
        if self.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output  # v_prediction

    def _lambda(self, idx: int) -> tuple[np.float32, np.float32, np.float32]:
        alpha, sigma = self._alpha_sigma(self.sigmas[idx])
        with np.errstate(divide="ignore"):
            lam = _f32_log(alpha) - _f32_log(sigma)  # +inf at the final sigma 0, as in diffusers
        return alpha, sigma, lam

    def _first_order(self, x0: np.ndarray, sample: np.ndarray) -> np.ndarray:
        alpha_t, sigma_t, lambda_t = self._lambda(self._step_index + 1)
        _, sigma_s, lambda_s = self._lambda(self._step_index)
        h = lambda_t - lambda_s
        return (sigma_t / sigma_s) * sample - (alpha_t * (_f32_exp(-h) - _F32(1.0))) * x0

    def _second_order(self, sample: np.ndarray) -> np.ndarray:
        alpha_t, sigma_t, lambda_t = self._lambda(self._step_index + 1)
        _, sigma_s0, lambda_s0 = self._lambda(self._step_index)
        _, _, lambda_s1 = self._lambda(self._step_index - 1)
        m0, m1 = self._model_outputs[-1], self._model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        r0 = h_0 / h
        d0, d1 = m0, (_F32(1.0) / r0) * (m0 - m1)
        phi = alpha_t * (_f32_exp(-h) - _F32(1.0))
        if self.solver_type == "midpoint":
            return (sigma_t / sigma_s0) * sample - phi * d0 - (_F32(0.5) * phi) * d1
        return (sigma_t / sigma_s0) * sample - phi * d0 + (alpha_t * ((_f32_exp(-h) - _F32(1.0)) / h + _F32(1.0))) * d1

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray) -> np.ndarray:
        """One multistep DPM-Solver++ update; returns the float32 sample at the next (lower) timestep."""
        self._require_timesteps()
        if self._step_index is None:
            matches = np.flatnonzero(self.timesteps == t)
            # diffusers falls back to the last step for an unknown timestep.
            self._step_index = (
                len(self.timesteps) - 1 if len(matches) == 0 else int(matches[1] if len(matches) > 1 else matches[0])
            )
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"{type(self).__name__}: step() called more often than set_timesteps() allows")
        n = len(self.timesteps)
        lower_order_final = self._step_index == n - 1 and (
            self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
        )
        model_output, sample = _as_f32(model_output), _as_f32(sample)
        x0 = self._convert_model_output(model_output, sample)
        self._model_outputs = self._model_outputs[1:] + [x0]
        if self.solver_order == 1 or self._lower_order_nums < 1 or lower_order_final:
            prev = self._first_order(x0, sample)
        else:
            prev = self._second_order(sample)
        self._lower_order_nums = min(self._lower_order_nums + 1, self.solver_order)
        self._step_index += 1
        return prev.astype(_F32, copy=False)


# ---------------------------------------------------------------------------------------------------------------
# Flow matching Euler (SD3)
# ---------------------------------------------------------------------------------------------------------------


class FlowMatchEulerDiscreteScheduler(Scheduler):
    """diffusers.FlowMatchEulerDiscreteScheduler with a static shift (SD3 / SD3.5)."""

    _supported = ("num_train_timesteps", "shift")
    _fixed = MappingProxyType(
        {
            "use_dynamic_shifting": False,
            "invert_sigmas": False,
            "shift_terminal": None,
            "use_karras_sigmas": False,
            "use_exponential_sigmas": False,
            "use_beta_sigmas": False,
            "stochastic_sampling": False,
        }
    )
    # Only read by dynamic shifting.
    _harmless = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type")

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift = float(shift)
        n = self.num_train_timesteps
        # diffusers' __init__ runs this in float32 torch; only sigma_max / sigma_min survive into set_timesteps.
        timesteps = np.linspace(1, n, n, dtype=_F32)[::-1].copy()
        sigmas = timesteps / _F32(n)
        sigmas = _F32(self.shift) * sigmas / (_F32(1.0) + _F32(self.shift - 1) * sigmas)
        self.sigma_max = float(sigmas[0])
        self.sigma_min = float(sigmas[-1])
        self.timesteps = sigmas * _F32(n)
        self.sigmas = sigmas
        self._step_index: int | None = None

    def set_timesteps(self, num_inference_steps: int) -> None:
        """float32 timesteps = shifted sigmas × num_train_timesteps; sigmas get a final 0."""
        n = int(num_inference_steps)
        N = self.num_train_timesteps
        # float64 here, as diffusers does it in numpy before the float32 cast.
        timesteps = np.linspace(self.sigma_max * N, self.sigma_min * N, n)
        sigmas = timesteps / N
        sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        sigmas = sigmas.astype(_F32)
        self.timesteps = sigmas * _F32(N)
        self.sigmas = np.concatenate([sigmas, np.zeros(1, dtype=_F32)])
        self.num_inference_steps = n
        self._step_index = None

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray) -> np.ndarray:
        """Euler step of the flow ODE: sample + (sigma_next - sigma) * velocity."""
        self._require_timesteps()
        if isinstance(t, (int, np.integer)):
            raise ValueError(f"{type(self).__name__}: pass a value of .timesteps, not an integer index")
        if self._step_index is None:
            self._step_index = self._first_index(t)
        if self._step_index >= self.num_inference_steps:
            raise ValueError(f"{type(self).__name__}: step() called more often than set_timesteps() allows")
        dt = self.sigmas[self._step_index + 1] - self.sigmas[self._step_index]
        self._step_index += 1
        return _as_f32(sample) + dt * _as_f32(model_output)


# ---------------------------------------------------------------------------------------------------------------
# DDIM (eta = 0)
# ---------------------------------------------------------------------------------------------------------------


class DDIMScheduler(Scheduler):
    """diffusers.DDIMScheduler, deterministic (eta = 0)."""

    _supported = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "clip_sample",
        "set_alpha_to_one",
        "steps_offset",
        "prediction_type",
        "clip_sample_range",
        "timestep_spacing",
    )
    _fixed = MappingProxyType({"thresholding": False, "rescale_betas_zero_snr": False})
    _harmless = ("dynamic_thresholding_ratio", "sample_max_value")

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Any = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        clip_sample_range: float = 1.0,
        timestep_spacing: str = "leading",
    ) -> None:
        name = type(self).__name__
        _check_choice(name, "prediction_type", prediction_type, ("epsilon", "v_prediction", "sample"))
        _check_choice(name, "timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        self.num_train_timesteps = int(num_train_timesteps)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.steps_offset = int(steps_offset)
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        betas = _betas(self.num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas_cumprod = _alphas_cumprod(betas)
        self.final_alpha_cumprod = _F32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps = np.arange(self.num_train_timesteps - 1, -1, -1, dtype=np.int64)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """int64 timesteps, spaced as diffusers does (note: step() always jumps by N // n, as in diffusers)."""
        n = int(num_inference_steps)
        N = self.num_train_timesteps
        if n > N:
            raise ValueError(f"{type(self).__name__}: num_inference_steps={n} exceeds num_train_timesteps={N}")
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, N - 1, n).round()[::-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            timesteps = (np.arange(0, n) * (N // n)).round()[::-1].copy().astype(np.int64)
            timesteps += self.steps_offset
        else:  # trailing
            timesteps = np.round(np.arange(N, 0, -N / n)).astype(np.int64)
            timesteps -= 1
        self.timesteps = timesteps
        self.num_inference_steps = n

    def step(self, model_output: np.ndarray, t: Any, sample: np.ndarray) -> np.ndarray:
        """Deterministic DDIM update from timestep t to t - N // n."""
        self._require_timesteps()
        model_output, sample = _as_f32(model_output), _as_f32(sample)
        t = int(t)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = _F32(1.0) - alpha_prod_t
        sqrt_a, sqrt_b = np.sqrt(alpha_prod_t), np.sqrt(beta_prod_t)
        if self.prediction_type == "epsilon":
            x0 = (sample - sqrt_b * model_output) / sqrt_a
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - sqrt_a * x0) / sqrt_b
        else:  # v_prediction
            x0 = sqrt_a * sample - sqrt_b * model_output
            eps = sqrt_a * model_output + sqrt_b * sample
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range).astype(_F32, copy=False)
        # eta = 0: the std-dev term vanishes, leaving sqrt(1 - alpha_prev) as the direction weight.
        direction = np.sqrt(_F32(1.0) - alpha_prod_t_prev) * eps
        return np.sqrt(alpha_prod_t_prev) * x0 + direction


# ---------------------------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------------------------

SCHEDULERS: Mapping[str, type[Scheduler]] = MappingProxyType(
    {
        "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
        "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
        "DDIMScheduler": DDIMScheduler,
    }
)


def scheduler_from_config(config: Mapping[str, Any]) -> Scheduler:
    """Build the scheduler named by config["_class_name"] (a diffusers scheduler_config.json dict).

    Raises UserError for an unsupported class, ValueError (from from_config) for an unsupported field.
    """
    name = config.get("_class_name")
    cls = SCHEDULERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise UserError(f"unsupported scheduler {name!r}; supported: {', '.join(SCHEDULERS)}")
    return cls.from_config(config)
