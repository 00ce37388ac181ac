"""The text-to-image loop on an artifact package (numpy + a backend, no torch), step for step as diffusers does it.

PixArt-Σ (PixArtSigmaPipeline) and SD3 (StableDiffusion3Pipeline):
  tokenize -> text encoder(s) -> scheduler loop with classifier-free guidance (uncond first) -> VAE decoder -> uint8.
Initial noise comes from numpy (`initial_noise`), so `edit-mobile validate` can hand the very same array to
diffusers as `latents`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .atomic import write_file_atomic
from .backends import BACKENDS, component_backend
from .binning import resize_and_crop
from .errors import UserError
from .families import family, unscale_latents
from .heap import trim_heap
from .io_specs import to_numpy_dtype
from .package import Package, load_package
from .schedulers import scheduler_from_config
from .tokenizer import PromptTokenizer


def initial_noise(package: Package, seed: int) -> np.ndarray:
    """float32 (1, C, h, w) standard normal noise from `seed`, NOT yet scaled by the scheduler's init_noise_sigma.

    Pass it to diffusers as `latents=`: PixArtSigmaPipeline multiplies passed latents by init_noise_sigma (as
    `Text2ImagePipeline` does), StableDiffusion3Pipeline uses them as they are (as `Text2ImagePipeline` does).
    """
    return np.random.default_rng(seed).standard_normal((1, *package.latent_shape), dtype=np.float32)


@dataclass
class GenerationResult:
    image: np.ndarray | None  # uint8 (H, W, 3); None when called with decode=False
    latents: list[np.ndarray]  # latents after each step, float32 (1, C, h, w)
    initial_latents: np.ndarray  # the loop's starting latents (noise * init_noise_sigma where diffusers scales)
    timesteps: np.ndarray
    # Only with record=True:
    text_embeddings: dict[str, np.ndarray] = field(default_factory=dict)  # name -> array, CFG batch (uncond, cond)
    transformer_inputs: list[list[dict[str, np.ndarray]]] = field(default_factory=list)  # per step, per call
    noise_preds: list[np.ndarray] = field(default_factory=list)  # per step, after guidance / learned-sigma cut
    decoded: np.ndarray | None = None  # VAE decoder output, float32 (1, 3, H, W)


MEMORY_MODES = ("default", "low")


class Text2ImagePipeline:
    """`Text2ImagePipeline(package)("a cat")` -> GenerationResult with a uint8 image."""

    def __init__(
        self,
        package: Package | str | Path,
        backend: str | None = None,
        threads: int | None = None,
        optimization: str = "all",
        providers: list[str] | None = None,
        progress: bool = True,
        backends: dict | None = None,
        memory: str = "default",
        cpu_arena: bool = True,
        mem_pattern: bool = False,
        shared_weights=None,
        shared_arena: bool = False,
    ):
        """`backends`: already created backends by component name (e.g. `edit-mobile bench` passes instrumented
        ones, after timing their creation); the components not in it are created here.

        `memory`: "default" creates every component's session up front and keeps them (fastest for many images);
        "low" creates each one when the loop first needs it and releases it when the loop is done with it (text
        encoders after the prompt, the transformer after the last step, the VAE decoder after decoding), so that
        only one component's weights are in memory at a time (one chunk of a chunked text encoder), with ONNX
        Runtime's CPU arena off. The images are the same. `cpu_arena`, `shared_arena`, `mem_pattern`: ONNX
        Runtime's memory arena (default mode only), one arena for every component instead of one each, and
        pre-planned activation buffers (runtime/ort_backend.py; other backends ignore them).
        `shared_weights`: one `runtime/shared_weights.py: SharedWeights` given to the pipelines of several sizes of
        one package, so that their sessions hold one copy of the weights."""
        if backend is not None and backend not in BACKENDS:
            raise UserError(f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})")
        if memory not in MEMORY_MODES:
            raise UserError(f"unknown memory mode {memory!r} (choose from {', '.join(MEMORY_MODES)})")
        self.package = package if isinstance(package, Package) else load_package(package)
        self.family = self.package.family
        self.family_spec = family(self.family)  # runtime/families.py: text encoders, conditioning, scaling rules
        self.progress = progress
        try:
            self._scheduler_config = self.package.scheduler_config()
            scheduler_from_config(self._scheduler_config)  # fail now on an unsupported scheduler, not mid-call
        except ValueError as e:
            raise UserError(f"package scheduler: {e}") from None
        encoders = [e.component for e in self.family_spec.text_encoders]
        self.tokenizers = {}
        for name in encoders:
            spec = self.package.text_for(name)
            self.tokenizers[name] = PromptTokenizer(spec.path, spec.max_length, spec.pad_id)
        self._given = dict(backends or {})
        self._encoders, self.memory = encoders, memory
        # Low-memory mode streams a chunked text encoder (it runs once per prompt): one chunk in memory at a time.
        # ONNX Runtime's CPU arena keeps what a session freed until the session ends; low-memory mode turns it
        # off (measured on PixArt-Σ-XL at 512²: peak 4.0 GB instead of 7.0 GB, docs/memory.md).
        kw = dict(threads=threads, optimization=optimization, providers=providers, mem_pattern=mem_pattern,
                  cpu_arena=cpu_arena and memory == "default", shared_arena=shared_arena,
                  shared_weights=shared_weights)  # fmt: skip
        # A method, not a lambda closing over self: that cycle kept every session alive after the pipeline was
        # dropped, until the garbage collector ran (calibration at 4 sizes of PixArt-Σ-XL: +7 GB per size).
        self._backend_options = (backend, kw)
        names = [*encoders, "transformer", "vae_decoder"]
        self.models: dict = {}  # the components' live backends
        if memory == "default":
            for name in names:
                self._backend(name)
        self._specs = {name: {s.name: s for s in self.package.input_specs(name)} for name in names}

    # --- components ----------------------------------------------------------------------------------------------
    def _backend(self, name: str):
        if name not in self.models:
            self.models[name] = self._given[name] if name in self._given else self._create(name)
        return self.models[name]

    def _create(self, name: str):
        backend, kw = self._backend_options
        created = component_backend(
            self.package, name, backend, stream_chunks=self.memory == "low" and name in self._encoders, **kw
        )
        if self.memory == "low":
            trim_heap()  # what loading the session freed (runtime/heap.py)
        return created

    def _release(self, *names: str) -> None:
        """Low-memory mode: drop these components' sessions (they are created again when next needed) and give
        their memory back to the system."""
        if self.memory == "low":
            for name in names:
                self.models.pop(name, None)
            trim_heap()

    def _run(self, name: str, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run one component, casting inputs to the manifest dtypes (fp16 packages) and outputs to float32."""
        specs = self._specs[name]
        cast = {
            k: np.ascontiguousarray(v, dtype=to_numpy_dtype(specs[k].dtype)) if k in specs else v
            for k, v in inputs.items()
        }
        out = self._backend(name).run(cast)
        return {
            k: v.astype(np.float32, copy=False) if np.issubdtype(v.dtype, np.floating) else v for k, v in out.items()
        }

    def encode_prompt(self, prompt: str) -> dict[str, np.ndarray]:
        """One prompt's transformer conditioning, batch 1, by input name (the family's `conditioning`), e.g.
        pixart: {"encoder_hidden_states": (1,T,D), "encoder_attention_mask": f32 (1,T)};
        sd3: {"encoder_hidden_states": (1,77+T,D), "pooled_projections": (1,P_1+P_2)}.
        """
        return self.family_spec.encode_prompt(prompt, self.tokenizers, self._run)

    def _denoise(self, latent_input: np.ndarray, t, cond: dict[str, np.ndarray], record: list | None) -> np.ndarray:
        """Transformer on the (CFG-)batched input; a batch-1 package gets one call per batch row."""
        rows = latent_input.shape[0]
        timestep = np.full((rows,), t, dtype=np.float32)
        batch = self.package.batch
        outs = []
        for start in range(0, rows, batch):
            inputs = {
                "sample": latent_input[start : start + batch],
                "timestep": timestep[start : start + batch],
                **{k: v[start : start + batch] for k, v in cond.items()},
            }
            if inputs["sample"].shape[0] < batch:  # no CFG on a batch-2 package: repeat the row, keep the first
                inputs = {k: np.concatenate([v] * batch) for k, v in inputs.items()}
            if record is not None:
                record.append(inputs)
            outs.append(self._run("transformer", **inputs)["out_sample"][: rows - start])
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def decode(self, latents: np.ndarray, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Final latents -> (uint8 (H,W,3) image, decoder output (1,3,H,W)); `size` (height, width): resized and
        centre-cropped to it, as diffusers' PixArt-Σ resolution binning (runtime/binning.py)."""
        decoded = self._run("vae_decoder", latent_sample=unscale_latents(latents, self.package.vae))["sample"]
        if size is not None:
            decoded = resize_and_crop(decoded, *size)
        return to_uint8(decoded), decoded

    # --- the loop ------------------------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        steps: int = 20,
        guidance: float | None = None,
        seed: int = 0,
        latents: np.ndarray | None = None,
        callback: Callable[[int, object, np.ndarray], None] | None = None,
        record: bool = False,
        phase: Callable[[str], None] | None = None,
        output_size: tuple[int, int] | None = None,
        decode: bool = True,
    ) -> GenerationResult:
        """Generate one image. `latents` (unscaled noise, (1,C,h,w)) overrides `seed`; `record` keeps the text
        embeddings, every transformer input and every guided noise prediction (memory: steps x inputs); `phase` is
        told each phase as it starts ("text_encoding", "denoising", "decoding") and "done" at the end (`bench`
        measures memory per phase with it). `output_size` (height, width): the image is resized to it from the
        package's size (`Package.generation_size`: a size binned to one of the package's buckets). `decode=False`
        stops after the last step (no image): what calibration needs when no VAE encoder is quantized, and the tiled
        decode is most of a 2048² run."""
        if steps < 1:
            raise UserError(f"steps must be >= 1, got {steps}")
        phase = phase or (lambda name: None)
        phase("text_encoding")
        guidance = self.family_spec.default_guidance if guidance is None else float(guidance)
        do_cfg = guidance > 1.0  # as diffusers: guidance <= 1 runs the conditional branch only
        C = self.package.latent_shape[0]

        cond = self.encode_prompt(prompt)
        if do_cfg:
            uncond = self.encode_prompt(negative_prompt or "")
            cond = {k: np.concatenate([uncond[k], cond[k]]) for k in cond}
        self._release(*self._encoders)

        phase("denoising")
        scheduler = scheduler_from_config(self._scheduler_config)
        scheduler.set_timesteps(steps)
        if latents is None:
            latents = initial_noise(self.package, seed)
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != (1, *self.package.latent_shape):
            raise ValueError(f"latents have shape {latents.shape}, expected {(1, *self.package.latent_shape)}")
        if self.family_spec.scales_initial_noise:  # as the family's diffusers pipeline treats passed latents
            latents = latents * np.float32(scheduler.init_noise_sigma)
        result = GenerationResult(image=None, latents=[], initial_latents=latents, timesteps=scheduler.timesteps)
        if record:
            result.text_embeddings = dict(cond)

        for i, t in enumerate(tqdm(scheduler.timesteps, desc="generate", unit="step", disable=not self.progress)):
            latent_input = np.concatenate([latents] * 2) if do_cfg else latents
            if self.family_spec.scales_model_input:
                latent_input = scheduler.scale_model_input(latent_input, t)
            calls = [] if record else None
            noise = self._denoise(latent_input, t, cond, calls)
            if do_cfg:
                noise_uncond, noise_text = noise[:1], noise[1:]
                noise = noise_uncond + guidance * (noise_text - noise_uncond)
            if self.package.transformer_out_channels == 2 * C:  # PixArt's learned sigma: keep the noise half
                noise = noise[:, :C]
            latents = np.asarray(scheduler.step(noise, t, latents), dtype=np.float32)
            result.latents.append(latents)
            if record:
                result.transformer_inputs.append(calls)
                result.noise_preds.append(noise)
            if callback is not None:
                callback(i, t, latents)

        self._release("transformer")
        if decode:
            phase("decoding")
            result.image, decoded = self.decode(latents, output_size)
            self._release("vae_decoder")
            if record:
                result.decoded = decoded
        phase("done")
        return result


def to_uint8(decoded: np.ndarray) -> np.ndarray:
    """VAE output (1,3,H,W) in [-1,1] -> uint8 (H,W,3), as diffusers' postprocess + numpy_to_pil. In place on one
    float copy (the same arithmetic): at 4096² each temporary would be another 0.2 GB at the decoding peak."""
    image = decoded[0] * np.float32(0.5)
    image += np.float32(0.5)
    np.clip(image, 0, 1, out=image)
    image *= np.float32(255)
    np.round(image, out=image)
    return image.transpose(1, 2, 0).astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H,W,3) image as PNG atomically (temporary file in the same folder, then rename)."""
    from PIL import Image

    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    return write_file_atomic(path, lambda f: Image.fromarray(image).save(f, format="PNG"))
