"""The numpy schedulers (runtime/schedulers.py) match diffusers step by step, and stay torch-free."""

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from edit_mobile.runtime import schedulers as np_sched
from edit_mobile.runtime.errors import UserError

TOL = 1e-6

PIXART_SIGMA = {
    "_class_name": "DPMSolverMultistepScheduler",
    "_diffusers_version": "0.22.0.dev0",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "lambda_min_clipped": -float("inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
DDIM_DEFAULT = {"_class_name": "DDIMScheduler"}

CASES = [
    # (name, config, steps)
    ("pixart-sigma", PIXART_SIGMA, (1, 2, 5, 20)),
    ("dpm-vpred-scaled-trailing", {**PIXART_SIGMA, "prediction_type": "v_prediction",
                                   "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                   "timestep_spacing": "trailing"}, (3, 25)),
    ("dpm-leading-offset-heun-sigmamin", {**PIXART_SIGMA, "timestep_spacing": "leading", "steps_offset": 1,
                                          "solver_type": "heun", "final_sigmas_type": "sigma_min"}, (4, 16)),
    ("dpm-order1-sample-cos", {**PIXART_SIGMA, "solver_order": 1, "prediction_type": "sample",
                               "beta_schedule": "squaredcos_cap_v2"}, (6,)),
    ("sd3", SD3, (1, 2, 5, 20, 28)),
    ("flow-shift1", {"_class_name": "FlowMatchEulerDiscreteScheduler"}, (7,)),
    ("ddim-default", DDIM_DEFAULT, (1, 2, 5, 20)),
    ("ddim-sd", {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}, (5, 20)),
    ("ddim-vpred-trailing", {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction",
                             "timestep_spacing": "trailing", "clip_sample": False}, (3, 10)),
    ("ddim-sample-linspace", {"_class_name": "DDIMScheduler", "prediction_type": "sample",
                              "timestep_spacing": "linspace", "clip_sample_range": 0.8}, (4,)),
]

REFERENCE = {
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
    "DDIMScheduler": DDIMScheduler,
}


def fake_model(sample: np.ndarray, t: float, config: dict, alphas_cumprod: np.ndarray | None) -> np.ndarray:
    """A fixed denoiser: its x0 guess is a nonlinear function of (sample, t), expressed in the config's
    prediction type so latents stay at unit scale (a wrong history or timestep still shows up)."""
    x = sample.astype(np.float64)
    x0 = 0.5 * np.tanh(x + 0.3 * np.sin(t / 100.0))
    if config["_class_name"] == "FlowMatchEulerDiscreteScheduler":
        out = (x - x0) / (t / 1000.0)  # velocity = noise - x0 for x_t = (1 - sigma) x0 + sigma noise
    else:
        a, s = np.sqrt(float(alphas_cumprod[int(t)])), np.sqrt(1.0 - float(alphas_cumprod[int(t)]))
        eps = (x - a * x0) / s
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[
            config.get("prediction_type", "epsilon")
        ]
    return out.astype(np.float32)


def _run_both(config: dict, steps: int) -> float:
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    ref = REFERENCE[config["_class_name"]](**kwargs)
    ours = np_sched.scheduler_from_config(config)
    ref.set_timesteps(steps)
    ours.set_timesteps(steps)
    ref_t = ref.timesteps.numpy()
    assert ours.timesteps.dtype == ref_t.dtype
    np.testing.assert_array_equal(ours.timesteps, ref_t)
    assert ours.init_noise_sigma == getattr(ref, "init_noise_sigma", 1.0)  # flow match has none: 1.0

    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    x_ref, x_ours = torch.from_numpy(latents.copy()), latents.copy()
    ac = getattr(ref, "alphas_cumprod", None)
    ac = None if ac is None else ac.numpy()
    ref_scale = getattr(ref, "scale_model_input", lambda x, t: x)  # flow match has none (identity)
    worst = 0.0
    for t_ref, t_ours in zip(ref.timesteps, ours.timesteps):
        out_ref = torch.from_numpy(fake_model(ref_scale(x_ref, t_ref).numpy(), float(t_ref), config, ac))
        out_ours = fake_model(ours.scale_model_input(x_ours, t_ours), float(t_ours), config, ac)
        x_ref = ref.step(out_ref, t_ref, x_ref).prev_sample
        x_ours = ours.step(out_ours, t_ours, x_ours)
        assert x_ours.dtype == np.float32 and x_ours.shape == latents.shape
        err = float(np.abs(x_ours - x_ref.numpy()).max())
        assert err <= TOL, f"t={t_ours}: max abs diff {err:.3g}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize(("name", "config", "steps"), CASES, ids=[c[0] for c in CASES])
def test_matches_diffusers(name, config, steps):
    for n in steps:
        worst = _run_both(config, n)
        logging.getLogger(__name__).info("%s steps=%d max abs diff %.3g", name, n, worst)


def test_state_resets_on_set_timesteps():
    ours = np_sched.scheduler_from_config(PIXART_SIGMA)
    x = np.random.default_rng(1).standard_normal((1, 4, 4, 4)).astype(np.float32)
    results = []
    for _ in range(2):
        ours.set_timesteps(5)
        y = x
        for t in ours.timesteps:
            y = ours.step(fake_model(y, float(t), PIXART_SIGMA, ours.alphas_cumprod), t, y)
        results.append(y)
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize(
    ("start", "end", "steps"),
    [(0.0001, 0.02, 1000), (0.00085**0.5, 0.012**0.5, 1000), (0.00085, 0.012, 999), (1.0, 1000.0, 37)],
)
def test_linspace_matches_torch_bit_for_bit(start, end, steps):
    ref = torch.linspace(start, end, steps, dtype=torch.float32).numpy()
    np.testing.assert_array_equal(np_sched._torch_linspace_f32(start, end, steps), ref)


def test_full_diffusers_config_accepted_without_warnings(caplog):
    """Every key diffusers writes to scheduler_config.json is known (supported, fixed or harmless)."""
    for cls in REFERENCE.values():
        config = {"_class_name": cls.__name__, "_diffusers_version": "0.42.1", **dict(cls().config)}
        with caplog.at_level(logging.WARNING, logger=np_sched.__name__):
            np_sched.scheduler_from_config(config)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


def test_unsupported_class_raises_user_error():
    with pytest.raises(UserError, match="EulerAncestralDiscreteScheduler"):
        np_sched.scheduler_from_config({"_class_name": "EulerAncestralDiscreteScheduler"})
    with pytest.raises(UserError):
        np_sched.scheduler_from_config({})


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({**PIXART_SIGMA, "use_karras_sigmas": True}, "use_karras_sigmas"),
        ({**PIXART_SIGMA, "thresholding": True}, "thresholding"),
        ({**PIXART_SIGMA, "solver_order": 3}, "solver_order"),
        ({**PIXART_SIGMA, "algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ({**SD3, "use_dynamic_shifting": True}, "use_dynamic_shifting"),
        ({**SD3, "invert_sigmas": True}, "invert_sigmas"),
        ({**DDIM_DEFAULT, "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({**DDIM_DEFAULT, "beta_schedule": "sigmoid"}, "beta_schedule"),
    ],
)
def test_unsupported_field_raises_value_error(config, field):
    with pytest.raises(ValueError, match=field):
        np_sched.scheduler_from_config(config)


def test_runtime_schedulers_do_not_import_torch():
    code = (
        "import sys, edit_mobile.runtime.schedulers; "
        "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
