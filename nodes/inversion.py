"""TVE_DDIMInversion: deterministic DDIM inversion of the frames with the artist's own model.

DDIM with η = 0 is Euler on the probability-flow ODE in σ-space (Song et al. 2021, Eq. 13; Karras et al. 2022,
Alg. 1): ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·ε̂(x_i, σ_i)`` with ``ε̂ = (x − D(x; σ))/σ``. Walking the grid upwards
inverts the sampler that walks it downwards (TokenFlow §4 / FLATTEN §4: inversion with guidance 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from . import host, passes, sockets

CATEGORY = "video editing/TVE"
SIGMA_RTOL = 1e-4


@dataclass(frozen=True, eq=False)
class Inversion:
    """The TVE_INVERSION socket value: the source video at every σ of the grid, and what it was made with."""
    sigmas: torch.Tensor        # (N+1,) descending σ grid ending with 0, float32 CPU
    latents: torch.Tensor       # (N+1, F, C, h, w) model-space source latents at each σ, model dtype
    conditioning: list          # the source CONDITIONING the inversion used
    family: str                 # host.model_family() of the inverting model

    @property
    def frames(self) -> int:
        return self.latents.shape[1]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def index_of(self, sigma: float) -> int:
        """Index of ``sigma`` on the grid; ValueError when it is not a grid σ."""
        i = int(torch.argmin((self.sigmas - sigma).abs()))
        if abs(float(self.sigmas[i]) - sigma) > SIGMA_RTOL * max(abs(sigma), 1e-3):
            raise ValueError(
                f"sigmas: the sampler is at σ={sigma:.5f}, which is not on the inversion's σ grid "
                f"({self.steps} steps, {float(self.sigmas[0]):.4f}→0); sample with the SIGMAS output of "
                "TVE_DDIMInversion (or the same steps and scheduler)")
        return i

    def check_schedule(self, sigmas: torch.Tensor) -> None:
        """Before sampling: every σ of the sampler's schedule is a grid σ (part of the grid, e.g. from a later
        start step, is fine); the sampler may evaluate between them."""
        for sigma in sigmas.reshape(-1).tolist():
            self.index_of(float(sigma))

    def position_of(self, sigma: float) -> float:
        """Where σ lies on the descending grid: i + (σ_i − σ)/(σ_i − σ_{i+1}) for σ_i ≥ σ ≥ σ_{i+1}."""
        grid = self.sigmas
        top = float(grid[0])
        if sigma > top * (1 + SIGMA_RTOL) or sigma < 0:
            raise ValueError(f"sigmas: the sampler evaluates σ={sigma:.5f}, outside the inversion's grid "
                             f"({top:.4f}→0); no source latent exists there")
        i = int(torch.argmin((grid - sigma).abs()))
        if abs(float(grid[i]) - sigma) <= SIGMA_RTOL * max(abs(sigma), 1e-3):
            return float(i)
        i = int((grid >= sigma).sum()) - 1                     # σ_i > σ > σ_{i+1}
        hi, lo = float(grid[i]), float(grid[i + 1])
        return i + (hi - sigma) / (hi - lo)

    def step_of(self, sigma: float) -> int:
        """The grid step whose interval holds σ (σ_i ≥ σ > σ_{i+1}): schedule fractions count on it."""
        return min(int(self.position_of(sigma)), self.steps - 1)

    def source_at(self, sigma: float, frame_ids: Sequence[int], order: str = "sigma-matched"
                  ) -> tuple[torch.Tensor, float]:
        """(source latents of ``frame_ids`` (F, C, h, w), their σ) for a model evaluation at ``sigma``.

        sigma-matched: the source at the same σ (the papers); clean-first: mirrored along the grid (step i reads
        inversion step i, cleanest first: what other ComfyUI packs do). Between grid σ (dpm_2, SDE and adaptive
        samplers evaluate there) the latent is interpolated linearly in σ between its neighbours: DDIM inversion
        walks a straight line in σ from one grid σ to the next (x_{i+1} = x_i + (σ_{i+1} − σ_i)·ε̂(x_i, σ_i)), so
        this is the inversion's own Euler step from the grid σ below, at no cost (exact for a 1× inversion; with a
        finer inversion it is the chord of the finer path).
        """
        p = self.position_of(sigma)
        if order == "clean-first":
            p = self.steps - p
        i = min(int(p), self.steps)
        f = p - i
        ids = list(frame_ids)
        if f <= 0:
            return self.latents[i][ids], float(self.sigmas[i])
        lo, hi = self.latents[i][ids].float(), self.latents[i + 1][ids].float()
        latent = ((1 - f) * lo + f * hi).to(self.latents.dtype)
        return latent, (1 - f) * float(self.sigmas[i]) + f * float(self.sigmas[i + 1])

    def check_call(self, x_in: torch.Tensor, frame_ids: Sequence[int], windowed: bool) -> None:
        """A sampler call over the inverted frames: same per-frame latent shape, frames of the video."""
        frames, shape = self.frames, self.latent_shape
        if tuple(x_in.shape[1:]) != shape[1:]:
            raise ValueError(f"latent: the sampled latent is {tuple(x_in.shape[1:])} per frame but the inversion's "
                             f"is {shape[1:]}; sample the inverted latent")
        if not windowed and x_in.shape[0] != frames:
            raise ValueError(f"latent: {x_in.shape[0]} frames are sampled but the inversion has {frames}")
        if max(frame_ids) >= frames:
            raise ValueError(f"latent: frame {max(frame_ids)} is sampled but the inversion has {frames} frames")

    def check_model(self, model: Any) -> None:
        family = host.model_family(model)
        if family != self.family:
            raise ValueError(f"inversion: made with a {self.family} model but this model is {family}; invert the "
                             "frames with the model you edit with")

    def check_latent(self, samples: torch.Tensor) -> None:
        if tuple(samples.shape) != self.latent_shape:
            raise ValueError(f"latent: shape {tuple(samples.shape)} differs from the inverted frames' "
                             f"{self.latent_shape}; use the inversion's latent")


def sample_ddim_inversion(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                          callback: Callable | None = None, disable: bool | None = None, *,
                          sigma_floor: float, record: Callable[[int, torch.Tensor], None] | None = None
                          ) -> torch.Tensor:
    """DDIM (η = 0) over an ascending σ grid, k-diffusion sampler signature. ``model(x, σ)`` returns D(x; σ).

    The first step starts at σ = 0 and evaluates the model at ``sigma_floor`` (the model's σ_min), the smallest
    noise level it was trained on. ``record(i, x)`` receives the latent reached at ``sigmas[i]``.
    """
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    if record is not None:
        record(0, x)
    for i in range(len(sigmas) - 1):
        sigma = torch.clamp(sigmas[i], min=sigma_floor)
        denoised = model(x, sigma * s_in, **extra_args)
        eps = (x - denoised) / sigma
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma, "denoised": denoised})
        x = x + (sigmas[i + 1] - sigmas[i]) * eps
        if record is not None:
            record(i + 1, x)
    return x


def invert(model: Any, samples: torch.Tensor, conditioning: list, steps: int, scheduler: str, multiple: int = 1
           ) -> tuple[torch.Tensor, Inversion]:
    """Invert raw-space latents ``samples`` (F, C, h, w); returns raw-space x_T and the INVERSION.

    With ``multiple`` > 1 the inversion walks ``steps·multiple`` steps (each sampling step split evenly in the model's
    timestep: the papers invert with more steps than they sample, TokenFlow 500 for 50) and keeps the source only
    at the ``steps``-step sampling grid's σ; x_T is at that grid's top σ, so the edit samples the same grid.
    """
    if steps < 2:
        raise ValueError(f"steps: inversion needs at least 2 steps, got {steps}")
    if multiple < 1:
        raise ValueError(f"inversion_multiple: expected at least 1 inversion step per sampling step, got {multiple}")
    if samples.ndim != 4:
        raise ValueError(f"latent: expected image latents (F, C, h, w), got shape {tuple(samples.shape)}")
    if scheduler not in host.scheduler_names():
        raise ValueError(f"scheduler: expected one of {host.scheduler_names()}, got '{scheduler}'")
    sigmas = host.sigma_grid(model, scheduler, steps)               # descending, ends with 0
    fine = host.subdivided_grid(model, sigmas, multiple)            # descending, contains every σ of ``sigmas``
    kept = {int(torch.argmin((fine - s).abs())): i for i, s in enumerate(sigmas)}   # fine index → grid index
    ascending = fine.flip(0)
    keep = host.intermediate_device()
    dtype = host.model_dtype(model)
    latents = torch.empty((len(sigmas),) + tuple(samples.shape), dtype=dtype, device=keep)

    def record(i: int, x: torch.Tensor) -> None:                    # i counts up the ascending fine grid
        grid_index = kept.get(len(fine) - 1 - i)
        if grid_index is not None:
            latents[grid_index] = x.detach().to(keep, dtype)

    m = passes.for_inversion(model)
    x_T = host.sample_with(m, sample_ddim_inversion, {"sigma_floor": host.sigma_min(model), "record": record},
                           ascending, conditioning, samples, callback=host.step_callback(len(fine) - 1))
    return x_T, Inversion(sigmas=sigmas, latents=latents, conditioning=conditioning, family=host.model_family(model))


class DDIMInversion:
    DESCRIPTION = ("Deterministic DDIM inversion (guidance 1) of the VAE-encoded frames with your model: returns "
                   "the inverted latent x_T, the INVERSION (the source at every σ, for injection and TokenFlow) "
                   "and the σ grid to sample with (KSamplerAdvanced with add_noise disabled, or "
                   "SamplerCustomAdvanced with DisableNoise). Patches on the model (e.g. FLATTEN) are active.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "latent": ("LATENT", {"tooltip": "The VAE-encoded source frames."}),
            "conditioning": ("CONDITIONING", {"tooltip": "The source prompt (an empty prompt is the usual choice)."}),
            "steps": ("INT", {"default": 50, "min": 2, "max": 1000}),
            "scheduler": (host.scheduler_names(), {"default": "ddim_uniform"}),
            "inversion_multiple": ("INT", {"default": 1, "min": 1, "max": 50, "tooltip": (
                "Inversion steps per sampling step: the inversion walks steps × this many steps (the papers invert "
                "with 10×: TokenFlow 500 for 50) for a more faithful x_T, and keeps the source only at the sampling "
                "grid's σ, so the edit still samples the SIGMAS output (steps steps).")}),
        }}

    RETURN_TYPES = ("LATENT", sockets.INVERSION, "SIGMAS")
    RETURN_NAMES = ("inverted_latent", "inversion", "sigmas")
    FUNCTION = "invert"
    CATEGORY = CATEGORY

    def invert(self, model, latent: dict, conditioning: list, steps: int, scheduler: str, inversion_multiple: int = 1):
        x_T, inversion = invert(model, latent["samples"], conditioning, steps, scheduler, inversion_multiple)
        return {"samples": x_T}, inversion, inversion.sigmas.clone()


NODES = {"TVE_DDIMInversion": (DDIMInversion, "DDIM Inversion (TVE)")}
