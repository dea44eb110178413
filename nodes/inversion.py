"""TVE_DDIMInversion: deterministic DDIM inversion of the frames with the artist's own model.

DDIM with η = 0 is Euler on the probability-flow ODE in σ-space (Song et al. 2021, Eq. 13; Karras et al. 2022,
Alg. 1): ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·ε̂(x_i, σ_i)`` with ``ε̂ = (x − D(x; σ))/σ``. Walking the grid upwards
inverts the sampler that walks it downwards (TokenFlow §4 / FLATTEN §4: inversion with guidance 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import host, sockets

CATEGORY = "video editing/TVE"
SIGMA_RTOL = 1e-4


def storage_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype the source latents are kept in: float32 for a float32 model, else float16 — never below fp16's
    11-bit significand, whatever the weights are (bf16 keeps 8 bits, fp8 e4m3 4: at σ ≈ 4 the top latent of an
    fp8 store was off by 0.23)."""
    return torch.float32 if model_dtype in (torch.float32, torch.float64) else torch.float16


@dataclass(frozen=True, eq=False)
class Inversion:
    """The TVE_INVERSION socket value: the source video at every σ of the grid, and what it was made with."""
    sigmas: torch.Tensor        # (N+1,) descending σ grid ending with 0, float32 CPU
    latents: torch.Tensor       # (N+1, F, C, h, w) model-space source latents at each σ, storage_dtype()
    conditioning: list          # the source CONDITIONING the inversion used
    family: str                 # host.model_family() of the inverting model

    @property
    def frames(self) -> int:
        return self.latents.shape[1]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.latents.shape[1:])

    def index_of(self, sigma: float) -> int:
        """Index of ``sigma`` on the grid; ValueError when the sampler walks another grid."""
        i = int(torch.argmin((self.sigmas - sigma).abs()))
        if abs(float(self.sigmas[i]) - sigma) > SIGMA_RTOL * max(abs(sigma), 1e-3):
            raise ValueError(
                f"sigmas: the sampler is at σ={sigma:.5f}, which is not on the inversion's σ grid "
                f"({len(self.sigmas) - 1} steps, {float(self.sigmas[0]):.4f}→0); sample with the SIGMAS output of "
                "TVE_DDIMInversion (or the same steps and scheduler)")
        return i

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


def invert(model: Any, samples: torch.Tensor, conditioning: list, steps: int, scheduler: str
           ) -> tuple[torch.Tensor, Inversion]:
    """Invert raw-space latents ``samples`` (F, C, h, w); returns raw-space x_T and the INVERSION."""
    if steps < 2:
        raise ValueError(f"steps: inversion needs at least 2 steps, got {steps}")
    if samples.ndim != 4:
        raise ValueError(f"latent: expected image latents (F, C, h, w), got shape {tuple(samples.shape)}")
    if scheduler not in host.scheduler_names():
        raise ValueError(f"scheduler: expected one of {host.scheduler_names()}, got '{scheduler}'")
    sigmas = host.sigma_grid(model, scheduler, steps)               # descending, ends with 0
    ascending = sigmas.flip(0)
    keep = host.intermediate_device()
    dtype = storage_dtype(host.model_dtype(model))
    latents = torch.empty((len(sigmas),) + tuple(samples.shape), dtype=dtype, device=keep)

    def record(i: int, x: torch.Tensor) -> None:                    # i counts up the ascending grid
        latents[len(sigmas) - 1 - i] = x.detach().to(keep, dtype)

    m = model.clone()
    m.model_options["transformer_options"]["tve_pass"] = "inversion"
    x_T = host.sample_with(m, sample_ddim_inversion, {"sigma_floor": host.sigma_min(model), "record": record},
                           ascending, conditioning, samples, callback=host.step_callback(steps))
    return x_T, Inversion(sigmas=sigmas, latents=latents, conditioning=conditioning, family=host.model_family(model))


class DDIMInversion:
    DESCRIPTION = ("Deterministic DDIM inversion (guidance 1) of the VAE-encoded frames with your model: returns "
                   "the inverted latent x_T, the INVERSION (the source at every σ, for injection and TokenFlow) "
                   "and the σ grid to sample with (KSamplerAdvanced with add_noise disabled, or "
                   "SamplerCustomAdvanced with DisableNoise). Patches on the model (e.g. FLATTEN) are active.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": (
                "The model you will edit with (with FLATTEN applied if you use it: the paper inverts with it).")}),
            "latent": ("LATENT", {"tooltip": "The VAE-encoded source frames."}),
            "conditioning": ("CONDITIONING", {"tooltip": "The source prompt (an empty prompt is the usual choice)."}),
            "steps": ("INT", {"default": 50, "min": 2, "max": 1000, "tooltip": (
                "Inversion steps; sample the edit with the SIGMAS output (the same grid). 50 is the papers' choice.")}),
            "scheduler": (host.scheduler_names(), {"default": "ddim_uniform", "tooltip": (
                "The σ grid: ddim_uniform is DDIM's timesteps (the papers); any core scheduler works.")}),
        }}

    RETURN_TYPES = ("LATENT", sockets.INVERSION, "SIGMAS")
    RETURN_NAMES = ("inverted_latent", "inversion", "sigmas")
    FUNCTION = "invert"
    CATEGORY = CATEGORY

    def invert(self, model, latent: dict, conditioning: list, steps: int, scheduler: str):
        x_T, inversion = invert(model, latent["samples"], conditioning, steps, scheduler)
        return {"samples": x_T}, inversion, inversion.sigmas.clone()


NODES = {"TVE_DDIMInversion": (DDIMInversion, "DDIM Inversion (TVE)")}
