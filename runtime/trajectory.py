"""The trajectory recorder: one sampling run, kept as every component of the package saw it.

Validation, calibration (ONNX quantization), the fp16-safety pass and Core ML activation quantization all need the
real inputs of every component along a sampling run. They share this module:

  `Trajectory`          a run's prompt and negative prompt, timesteps, every transformer call's inputs at every step,
                        the latents after each step and the decoded image;
  `TrajectoryRecorder`  records trajectories with the package's own loop (`Text2ImagePipeline`, `record=True`) on
                        any backend; `export/validate.py: run_reference` records the diffusers reference's;
  `Trajectory.inputs`   every component's input feeds, each with a label:
      text encoders  the prompt and the negative prompt, preprocessed and tokenized as the family's loop does
      transformer    every call at every step (both CFG halves; diffusers makes one call per step, a batch-1 package
                     two), labelled with the step and its timestep
      vae_decoder    the final latents, unscaled as the runtime passes them to the decoder
      vae_encoder    the decoded image in [-1, 1] (what an image-to-image caller would encode)

No torch here.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from .families import family, text_feed, unscale_latents
from .package import Package
from .pipeline import Text2ImagePipeline

Feed = tuple[dict, dict[str, np.ndarray]]  # (label, input name -> array)


@dataclass
class Trajectory:
    """One sampling run as its components saw it (see the module docstring)."""

    prompt: str
    negative_prompt: str
    timesteps: np.ndarray  # the scheduler's timesteps, one per step
    calls: list[list[dict[str, np.ndarray]]]  # per step, every transformer call's inputs
    latents: list[np.ndarray]  # after every step, float32 (1, C, h, w), as the transformer sees them (scaled)
    image: np.ndarray | None  # the decoded image, float32 (1, 3, H, W) in [-1, 1]; None if recorded undecoded
    source: str = "package"  # "package" (the package's own loop) or "reference" (diffusers): names the image

    def inputs(self, package: Package, tokenizers: Mapping) -> dict[str, list[Feed]]:
        """Per component (every text encoder of the family, transformer, vae_decoder, vae_encoder if the run was
        decoded): [(label, feed)].

        `tokenizers`: text encoder name -> PromptTokenizer (a `Text2ImagePipeline`'s); text feeds carry exactly
        the inputs the package's graph takes."""
        spec = family(package.family)
        feeds: dict[str, list[Feed]] = {}
        for enc in spec.text_encoders:
            wanted = {s.name for s in package.input_specs(enc.component)}
            tokenizer = tokenizers[enc.component]
            feeds[enc.component] = [
                ({"input": kind}, text_feed(tokenizer.encode(spec.preprocess(text)), wanted))
                for kind, text in (("prompt", self.prompt), ("negative_prompt", self.negative_prompt or ""))
            ]
        feeds["transformer"] = [
            ({"step": i, "timestep": float(np.asarray(call["timestep"]).ravel()[0])}, dict(call))
            for i, calls in enumerate(self.calls)
            for call in calls
        ]
        latents = unscale_latents(self.latents[-1], package.vae).astype(np.float32)
        feeds["vae_decoder"] = [({"input": "final latents"}, {"latent_sample": latents})]
        if self.image is not None:
            feeds["vae_encoder"] = [({"input": f"{self.source} image"}, {"sample": self.image.astype(np.float32)})]
        return feeds


class TrajectoryRecorder:
    """Records trajectories with the package's own sampling loop (numpy + `backend`)."""

    def __init__(
        self, package: Package, backend: str | None = None, threads: int | None = None, backends: dict | None = None
    ):
        """`backends`: already created backends by component name, as `Text2ImagePipeline` takes them."""
        self.package = package
        self.runtime = Text2ImagePipeline(package, backend=backend, threads=threads, progress=False, backends=backends)

    @property
    def default_guidance(self) -> float:
        return family(self.package.family).default_guidance

    def record(
        self,
        prompt: str,
        negative_prompt: str = "",
        steps: int = 20,
        guidance: float | None = None,
        seed: int = 0,
        decode: bool = True,
    ) -> Trajectory:
        """`decode=False`: no image (and no vae_encoder inputs), for callers that need the transformer's and the
        decoder's inputs only."""
        result = self.runtime(
            prompt, negative_prompt, steps=steps, guidance=guidance, seed=seed, record=True, decode=decode
        )
        return Trajectory(
            prompt=prompt,
            negative_prompt=negative_prompt,
            timesteps=result.timesteps,
            calls=result.transformer_inputs,
            latents=result.latents,
            image=None if result.decoded is None else np.clip(result.decoded, -1.0, 1.0),
        )

    def record_prompts(
        self, prompts: list[str], steps: int, guidance: float | None = None, seed: int = 0, decode: bool = True
    ) -> Iterator[Trajectory]:
        """One trajectory per prompt (empty negative prompt, seed `seed + index`), recorded as it is consumed."""
        for p, prompt in enumerate(prompts):
            yield self.record(prompt, "", steps=steps, guidance=guidance, seed=seed + p, decode=decode)

    def inputs(self, trajectory: Trajectory) -> dict[str, list[Feed]]:
        """`trajectory.inputs` with this package's tokenizers."""
        return trajectory.inputs(self.package, self.runtime.tokenizers)
