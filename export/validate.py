"""`edit-mobile validate`: the same prompt, seed and noise through the diffusers PyTorch pipeline and through the
package, compared per component, per denoising step and on the final image, with gates that fail."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..models.convert import load_pipeline, pipeline_family
from ..models.families import torch_family
from ..runtime.backends import backend_for_target, component_backend
from ..runtime.errors import UserError
from ..runtime.families import family
from ..runtime.manifest import GATES_DB, size_key
from ..runtime.metrics import compare, psnr
from ..runtime.package import Package, load_package, write_validation
from ..runtime.pipeline import Text2ImagePipeline, initial_noise
from ..runtime.tiling import TiledBackend
from ..runtime.trajectory import Trajectory
from .components import pipeline_components

logger = logging.getLogger(__name__)

IMAGE_GATE_DB = 40.0  # final image of an all-fp32 package against the PyTorch image
# Latents after every denoising step of an all-fp32 package against diffusers' (the worst step). Float noise of an
# exact export scores >= 133 dB on the tiny, mid-size and 28-block PixArt-Σ-XL models; a planted guidance /
# CFG-order / scheduler / tokenizer bug scores <= 42 dB (docs/validation.md). The gate sits between the two.
TRAJECTORY_GATE_DB = 60.0


@dataclass
class ValidationOptions:
    prompt: str = "a red circle on a white background"
    negative_prompt: str = ""
    steps: int = 20
    guidance: float | None = None
    seed: int = 0
    transformer_checks: int = 3  # timesteps (first, middle, last, ...) at which the transformer is compared
    min_component_psnr: float | None = None  # override every component gate
    min_image_psnr: float | None = None


def validation_backend(package: Package) -> str:
    """ONNX Runtime for ONNX packages; Core ML on macOS, else the numpy reference executor, for Core ML ones."""
    return backend_for_target(package.target)


def _to_np(x) -> np.ndarray:
    return x.detach().cpu().float().numpy() if torch.is_tensor(x) else np.asarray(x)


def run_reference(
    pipe, package: Package, opts: ValidationOptions, noise: np.ndarray, guidance: float
) -> tuple[Trajectory, np.ndarray]:
    """Run diffusers with the package's noise; record the latents after each step and the transformer's inputs.
    Returns the reference trajectory (runtime/trajectory.py) and diffusers' image, float (H, W, 3) in [0, 1]."""
    spec, torch_spec = family(package.family), torch_family(package.family)
    latents, calls = [], []

    def record_inputs(_module, args, kwargs):
        sample = args[0] if args else kwargs["hidden_states"]
        rec = {"sample": _to_np(sample), "timestep": _to_np(kwargs["timestep"]).astype(np.float32)}
        rec.update({name: _to_np(kwargs[name]).astype(np.float32) for name in spec.conditioning})
        calls.append([rec])

    height, width = package.resolution
    kwargs = dict(
        prompt=opts.prompt,
        negative_prompt=opts.negative_prompt,
        num_inference_steps=opts.steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        latents=torch.from_numpy(noise.copy()),
        output_type="np",
        max_sequence_length=package.text_for(spec.prompt_encoder.component).max_length,
        **torch_spec.reference_kwargs,
        **torch_spec.step_callback(lambda step_latents: latents.append(_to_np(step_latents).copy())),
    )
    hook = pipe.transformer.register_forward_pre_hook(record_inputs, with_kwargs=True)
    try:
        with torch.inference_mode():
            image = pipe(**kwargs).images[0]
    finally:
        hook.remove()
    return Trajectory(
        prompt=opts.prompt,
        negative_prompt=opts.negative_prompt,
        timesteps=np.asarray([c[0]["timestep"].ravel()[0] for c in calls]),
        calls=calls,
        latents=latents,
        image=(image.astype(np.float32).transpose(2, 0, 1)[None] * 2.0 - 1.0).astype(np.float32),
        source="reference",
    ), image


class TorchComponentBackend:
    """A component's PyTorch export wrapper behind the runtime's backend interface (fp32, any batch)."""

    def __init__(self, spec):
        self.spec = spec

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = []
        for s in self.spec.inputs:
            a = np.ascontiguousarray(inputs[s.name])
            args.append(torch.from_numpy(a.astype(np.float32) if np.issubdtype(a.dtype, np.floating) else a))
        with torch.inference_mode():
            out = self.spec.module(*args)
        outs = [out] if torch.is_tensor(out) else list(out)
        return {s.name: _to_np(t) for s, t in zip(self.spec.outputs, outs)}


def _batch_rows(feed: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """A transformer call at the package's static batch: diffusers calls with 1 row when guidance is off, which a
    batch-2 package runs with the row repeated (as the runtime does); the first `batch` rows otherwise."""
    rows = next(iter(feed.values())).shape[0]
    if rows >= batch:
        return {k: v[:batch] for k, v in feed.items()}
    return {k: np.concatenate([v] * -(-batch // rows))[:batch] for k, v in feed.items()}


def _worst(results: list[dict]) -> dict:
    return {
        "psnr_db": min(r["psnr_db"] for r in results),
        "max_abs": None if any(r["max_abs"] is None for r in results) else max(r["max_abs"] for r in results),
        "cosine": min(r["cosine"] for r in results),
        "finite": all(r["finite"] for r in results),
        "checks": len(results),
    }


def compare_components(
    specs: dict,
    package: Package,
    runtime: Text2ImagePipeline,
    opts: ValidationOptions,
    reference: Trajectory,
) -> dict:
    """Each component on identical inputs: the exported graph vs its PyTorch module (the export wrappers), on the
    reference trajectory's inputs: the prompt's tokens, the transformer at `opts.transformer_checks` steps (first,
    middle, last, ...), the VAE on the final latents / image."""
    recorded = reference.inputs(package, runtime.tokenizers)
    inputs: dict[str, list[dict]] = {
        name: [feed for label, feed in feeds if label.get("input") != "negative_prompt"]
        for name, feeds in recorded.items()
    }
    calls = inputs["transformer"]
    picks = np.unique(np.linspace(0, len(calls) - 1, min(opts.transformer_checks, len(calls))).round().astype(int))
    inputs["transformer"] = [_batch_rows(calls[i], package.batch) for i in picks]

    report = {}
    for name in package.components:
        if name not in specs:
            raise UserError(f"the reference pipeline has no component {name!r}")
        spec = specs[name]
        backend = runtime.models.get(name) or component_backend(package, name, validation_backend(package))
        out_names = [s.name for s in spec.outputs]
        # A tiled VAE (--vae-tile) is checked against its PyTorch module run on the same tiles with the same blend
        # (the export, exactly), and its blend against the untiled module is reported (the tiling's own error).
        tiling = package.components[name].entry.tiling
        torch_backend = TorchComponentBackend(spec)
        specs_in = [s.to_dict() for s in spec.inputs]
        reference_backend = TiledBackend(torch_backend, tiling, specs_in, out_names) if tiling else torch_backend
        results, untiled = [], []
        for feed in inputs[name]:
            args = {s.name: feed[s.name] for s in spec.inputs}
            ref = reference_backend.run(args)
            got = backend.run({s.name: feed[s.name].astype(s.dtype) for s in spec.inputs})
            results += [compare(ref[n], got[n].astype(np.float32)) for n in out_names]
            if tiling:
                full = torch_backend.run(args)
                untiled += [compare(full[n], got[n].astype(np.float32)) for n in out_names]
        report[name] = {"precision": package.components[name].precision, **_worst(results)}
        if tiling:
            report[name]["untiled"] = _worst(untiled)
    return report


def trajectory_psnr(timesteps, reference: list[np.ndarray], test: list[np.ndarray]) -> list[dict]:
    return [
        {"step": i, "timestep": float(t), "psnr_db": psnr(r, g)}
        for i, (t, r, g) in enumerate(zip(timesteps, reference, test))
    ]


def image_psnr(reference: np.ndarray, test: np.ndarray) -> float:
    """PSNR of two uint8 (H, W, 3) images, peak 255."""
    return psnr(reference.astype(np.float64), test.astype(np.float64), peak=255.0)


def check_loop(
    specs: dict,
    package: Package,
    opts: ValidationOptions,
    guidance: float,
    noise: np.ndarray,
    ref_latents: list[np.ndarray],
    ref_uint8: np.ndarray,
    package_image: np.ndarray,
) -> dict:
    """The package's own sampling loop (tokenizers, conditioning, CFG, scheduler, latent scaling, decoding) with the
    PyTorch fp32 components as backends, against diffusers, and the package's image against this loop's (reported).

    Only loop arithmetic differs from diffusers here, so every package, whatever its precision, is held to the fp32
    trajectory and image gates. This is what catches a runtime bug in a quantized or Core ML package, whose
    components are otherwise checked on inputs replayed from diffusers, where guidance never enters."""
    backends = {name: TorchComponentBackend(specs[name]) for name in package.components if name != "vae_encoder"}
    loop = Text2ImagePipeline(package, backend=validation_backend(package), backends=backends, progress=False)
    result = loop(opts.prompt, opts.negative_prompt, steps=opts.steps, guidance=guidance, latents=noise)
    trajectory = trajectory_psnr(result.timesteps, ref_latents, result.latents)
    worst = min(t["psnr_db"] for t in trajectory)
    image = image_psnr(ref_uint8, result.image)
    return {
        "trajectory_min_psnr_db": worst,
        "image_psnr_db": image,
        "gate_db": {"trajectory": TRAJECTORY_GATE_DB, "image": IMAGE_GATE_DB},
        "passed": bool(worst >= TRAJECTORY_GATE_DB and image >= IMAGE_GATE_DB),
        "package_image_vs_fp32_loop_psnr_db": image_psnr(result.image, package_image),
    }


def validate(
    package_dir: str, reference: str | None = None, opts: ValidationOptions | None = None, threads: int | None = None
) -> dict:
    """Validate every size of the package against `reference` (default: its source) and store the report in its
    manifest. One size: the report of `validate_size`; several: {"passed", "package", "reference", "sizes": {WxH:
    that size's report}}, passed when every size passes."""
    opts = opts or ValidationOptions()
    package = load_package(package_dir)
    reference = reference or package.source
    pipe = load_pipeline(reference)
    if pipeline_family(pipe) != package.family:
        raise UserError(f"reference {reference} is a {pipeline_family(pipe)} pipeline, the package {package.family}")
    reports = {key: validate_size(package.at_size(key), pipe, opts, threads) for key in package.sizes}
    if len(reports) == 1:
        report = next(iter(reports.values()))
    else:
        report = {"passed": all(r["passed"] for r in reports.values()), "sizes": reports}
    report = {**report, "package": str(package_dir), "reference": str(reference)}
    write_validation(package, report)
    return report


def validate_size(package: Package, pipe, opts: ValidationOptions, threads: int | None) -> dict:
    """One size of a package (`Package.at_size`) against the diffusers pipeline `pipe`: components, trajectory,
    loop and image, each with its gate."""
    runtime = Text2ImagePipeline(package, backend=validation_backend(package), threads=threads)
    guidance = opts.guidance if opts.guidance is not None else family(package.family).default_guidance
    noise = initial_noise(package, opts.seed)

    ref_run, ref_image = run_reference(pipe, package, opts, noise, guidance)
    ref_latents = ref_run.latents
    result = runtime(opts.prompt, opts.negative_prompt, steps=opts.steps, guidance=guidance, latents=noise)
    if len(ref_latents) != len(result.latents):
        raise RuntimeError(f"diffusers ran {len(ref_latents)} steps, the runtime {len(result.latents)}")

    specs = {
        s.name: s
        for s in pipeline_components(
            pipe,
            package.family,
            tuple(package.resolution),
            package.batch,
            package.text_for(family(package.family).prompt_encoder.component).max_length,
        )
    }
    components = compare_components(specs, package, runtime, opts, ref_run)
    for name, entry in components.items():
        # The gate a quantized package recorded for the component (`gate_psnr_db`), else the precision's default.
        recorded = package.components[name].entry.gate_psnr_db
        gate = (
            opts.min_component_psnr
            if opts.min_component_psnr is not None
            else float(recorded)
            if recorded is not None
            else GATES_DB.get(entry["precision"], GATES_DB["fp32"])
        )
        entry.update(gate_db=gate, passed=bool(entry["finite"] and entry["psnr_db"] >= gate))
    # A Core ML package's fp16 programs already run in fp16 here (Core ML on macOS, the reference executor's true
    # fp16 arithmetic elsewhere): a non-finite output fails its component's gate directly.
    fp16 = [n for n, c in package.components.items() if c.precision == "fp16" and package.target != "coreml"]
    if fp16:  # ONNX Runtime's CPU provider hides fp16 overflow: check in true fp16 arithmetic (export/fp16_safety.py)
        from .fp16_safety import check_fp16

        feeds = ref_run.inputs(package, runtime.tokenizers)
        for name, safety in check_fp16(specs, fp16, feeds).items():
            components[name]["fp16_safety"] = safety
            components[name]["passed"] = bool(components[name]["passed"] and safety["finite"])
    ref_uint8 = (ref_image * 255).round().astype(np.uint8)
    # End to end, the image and trajectory gates apply to all-fp32 packages; a quantized or Core ML package's are
    # reported, and gated only when --min-image-psnr asks for it (its components are gated by their precisions'
    # gates, its loop by the loop check below).
    all_fp32 = all((c.precision or "fp32") == "fp32" for c in package.components.values())
    # A tiled decoder's image differs from the untiled one by the blend (reported per component as "untiled"),
    # so its image is reported and not gated, like a quantized package's.
    untiled = all_fp32 and not any(c.entry.tiling for c in package.components.values())
    image_gate = opts.min_image_psnr if opts.min_image_psnr is not None else IMAGE_GATE_DB if untiled else None
    image_db = image_psnr(ref_uint8, result.image)
    trajectory = trajectory_psnr(result.timesteps, ref_latents, result.latents)
    worst_step = min(t["psnr_db"] for t in trajectory)
    trajectory_gate = TRAJECTORY_GATE_DB if all_fp32 else None
    loop = check_loop(specs, package, opts, guidance, noise, ref_latents, ref_uint8, result.image)
    report = {
        "passed": False,
        "size": size_key(package.resolution),
        "prompt": opts.prompt,
        "negative_prompt": opts.negative_prompt,
        "steps": opts.steps,
        "guidance": guidance,
        "seed": opts.seed,
        "components": components,
        "trajectory": trajectory,
        "trajectory_gate": {
            "min_psnr_db": worst_step,
            "gate_db": trajectory_gate,
            "passed": bool(trajectory_gate is None or worst_step >= trajectory_gate),
        },
        "loop": loop,
        "image": {
            "psnr_db": image_db,
            "gate_db": image_gate,
            "passed": bool(image_gate is None or image_db >= image_gate),
        },
    }
    report["passed"] = bool(
        report["image"]["passed"]
        and report["trajectory_gate"]["passed"]
        and loop["passed"]
        and all(c["passed"] for c in components.values())
    )
    return report


def format_report(report: dict) -> str:
    if "sizes" in report:
        parts = [f"size {key}:\n{format_report(r)}" for key, r in report["sizes"].items()]
        return "\n".join([*parts, f"{'PASSED' if report['passed'] else 'FAILED'} ({len(parts)} sizes)"])
    lines = [f"{'component':<16}{'precision':<14}{'PSNR dB':>9}{'gate':>7}{'max abs':>11}{'cosine':>10}  result"]
    for name, c in report["components"].items():
        max_abs = "non-finite" if c["max_abs"] is None else f"{c['max_abs']:.2e}"
        lines.append(
            f"{name:<16}{c['precision']:<14}{c['psnr_db']:>9.1f}{c['gate_db']:>7.0f}{max_abs:>11}"
            f"{c['cosine']:>10.6f}  {'ok' if c['passed'] else 'FAIL'}"
        )
        if "untiled" in c:  # reported, not gated: what blending tiles costs against one untiled pass
            u = c["untiled"]
            lines.append(f"{'  vs untiled':<30}{u['psnr_db']:>9.1f}{'':>7}{u['max_abs']:>11.2e}{u['cosine']:>10.6f}")
    traj, tg = report["trajectory"], report["trajectory_gate"]
    gate = "not gated: quantized package" if tg["gate_db"] is None else f"gate {tg['gate_db']:.0f}"
    lines.append(
        f"trajectory: {len(traj)} steps, latent PSNR min {tg['min_psnr_db']:.1f} dB ({gate}), "
        f"last {traj[-1]['psnr_db']:.1f} dB  {'ok' if tg['passed'] else 'FAIL'}"
    )
    loop = report["loop"]
    lines.append(
        f"loop (package loop, PyTorch components): latent PSNR min {loop['trajectory_min_psnr_db']:.1f} dB "
        f"(gate {loop['gate_db']['trajectory']:.0f}), image {loop['image_psnr_db']:.1f} dB "
        f"(gate {loop['gate_db']['image']:.0f})  {'ok' if loop['passed'] else 'FAIL'}; package image vs "
        f"this fp32 loop {loop['package_image_vs_fp32_loop_psnr_db']:.1f} dB"
    )
    for name, c in report["components"].items():
        if "fp16_safety" in c:
            safety = c["fp16_safety"]
            where = "; ".join(
                f"{ {k: v for k, v in b.items() if k != 'non_finite_values'} } {b['non_finite_values']}"
                for b in safety["non_finite"]
            )
            lines.append(
                f"fp16 safety (true fp16) {name}: {safety['checks']} checks, "
                + ("all finite" if safety["finite"] else f"NON-FINITE at {where}")
            )
    img = report["image"]
    gate = "not gated: quantized or tiled package" if img["gate_db"] is None else f"gate {img['gate_db']:.0f}"
    lines.append(f"image: PSNR {img['psnr_db']:.1f} dB ({gate})  {'ok' if img['passed'] else 'FAIL'}")
    lines.append("PASSED" if report["passed"] else "FAILED")
    return "\n".join(lines)
