"""DDIM inversion of the frames with the artist's own model, and the ``Inversion`` it makes (DDIM Inversion (TVE)).

DDIM with η = 0 is Euler on the probability-flow ODE in σ-space (Song et al. 2021, Eq. 13; Karras et al. 2022,
Alg. 1): ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·ε̂`` with ``ε̂ = (x − D(x; σ))/σ``. Walking the grid upwards
inverts the sampler that walks it downwards (TokenFlow §4 / FLATTEN §4: inversion with guidance 1). Where ε̂ is
evaluated is a choice (``FORMULAS``): at (x_i, σ_i), as FLATTEN's code does, or at σ_{i+1} on x_i, as TokenFlow's
code does (``sample_ddim_inversion``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Callable, Collection, Sequence

import torch

from . import host, validation
from .stack import for_inversion, stack_of
from .stored_source import StoredSource

SIGMA_RTOL = 1e-4
REMEMBERED_ENDS = 8              # per grid index: the last runs that ended there
FORMULAS = ("current_sigma", "next_sigma")   # where an inversion step evaluates ε̂ (sample_ddim_inversion)
DEFAULT_FORMULA = "next_sigma"               # TokenFlow's: reconstructs 1.9–2.7× better at 1× (bench/inversion.py)


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
    sampling: host.Sampling     # host.effective_sampling() of the inverting model
    source: torch.Tensor        # (F, k) validation.fingerprint of the raw latent that was inverted
    trace: torch.Tensor         # (N+1, F, k) fingerprints of ``latents`` before the cast to the model dtype
    weights: host.WeightsFingerprint   # host.weights_fingerprint() of the inverting model (LoRA, tuning included)
    # grid index -> fingerprints of the latents sampling runs with this inversion ended at there (a second sampler
    # may continue an edit from them); filled by ``remember_end``.
    ends: dict = field(default_factory=dict, compare=False, repr=False)
    # what was said about editing it with other weights (``say_once``): each difference once in the server log
    said: set = field(default_factory=set, compare=False, repr=False)
    # the source features kept for the edits to replay (FLATTEN's stored mode, ``stored_source.py``), or None
    stored: StoredSource | None = field(default=None, compare=False, repr=False)

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

    def say_once(self, what: str) -> bool:
        """Whether ``what`` (a note about this inversion) is new; it counts as said from now on."""
        new = what not in self.said
        self.said.add(what)
        return new

    def remember_end(self, model: Any, samples: torch.Tensor, sigma_end: float) -> None:
        """Keep the fingerprint of raw ``samples`` a run ended with at ``sigma_end`` (part-way down the grid), so
        a second sampler may start from them there (an edit sampled in two stages, e.g. after SplitSigmas)."""
        i = int(torch.argmin((self.sigmas - sigma_end).abs()))
        if i == len(self.sigmas) - 1 or abs(float(self.sigmas[i]) - sigma_end) > SIGMA_RTOL * max(sigma_end, 1e-3):
            return
        ends = self.ends.setdefault(i, [])
        ends.append(validation.fingerprint(host.process_latent_in(model, samples.float())))
        del ends[:-REMEMBERED_ENDS]


def sample_ddim_inversion(model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                          callback: Callable | None = None, disable: bool | None = None, *,
                          sigma_floor: float, record: Callable[[int, torch.Tensor], None] | None = None,
                          formula: str = "current_sigma",
                          input_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          features_at: Collection[int] = (),
                          keep_features: Callable[[int, bool], AbstractContextManager] | None = None
                          ) -> torch.Tensor:
    """DDIM (η = 0) over an ascending σ grid, k-diffusion sampler signature. ``model(x, σ)`` returns D(x; σ).

    Every step is ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·ε̂``; ``formula`` (``FORMULAS``) says where ε̂ is evaluated:

    * ``current_sigma``: ε̂(x_i, σ_i), where the latent is. The first step starts at σ = 0 and evaluates the model
      at ``sigma_floor`` (the model's σ_min), the smallest noise level it was trained on. FLATTEN's inversion
      (diffusers' DDIMInverseScheduler) evaluates here too.
    * ``next_sigma``: ε̂ at σ_{i+1}, the next, noisier level, with the diffusion model seeing x_i exactly as it
      would at σ_i (``input_scale``(σ_i)·x_i; ``input_scale`` is c_in(σ), e.g. ``host.input_scale(model)``):
      TokenFlow's inversion (preprocess.py ``ddim_inversion``: DDPM's x_{t_i} fed at timestep t_{i+1}). The step
      σ_{i+1} → σ_i of DDIM sampling is undone exactly by ε̂(x_{i+1}, σ_{i+1}); ``next_sigma`` stands in x_i for
      x_{i+1} only, ``current_sigma`` also σ_i for σ_{i+1}.

    ``record(i, x)`` receives the latent reached at ``sigmas[i]``. At each index i of ``features_at`` the model's
    call on (x_i, max(σ_i, ``sigma_floor``)) runs inside ``keep_features(i, features_only)``, which keeps its
    features (``stored_source.py``): with ``current_sigma`` that is the step's own call; with ``next_sigma``, and at
    the last σ, where no step evaluates there, one more call, ``features_only`` (its output is not used).
    """
    if formula not in FORMULAS:
        raise ValueError(f"formula: expected one of {list(FORMULAS)}, got {formula!r}")
    if formula == "next_sigma" and input_scale is None:
        raise ValueError("input_scale: the next_sigma formula needs the model's c_in(σ) (host.input_scale)")
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    if record is not None:
        record(0, x)
    if features_at and keep_features is None:
        raise ValueError("keep_features: features_at names calls whose features nobody keeps")

    def features_only(i: int) -> None:
        with keep_features(i, True):
            model(x, torch.clamp(sigmas[i], min=sigma_floor) * s_in, **extra_args)

    for i in range(len(sigmas) - 1):
        if formula == "current_sigma":
            sigma = torch.clamp(sigmas[i], min=sigma_floor)
            x_in = x
        else:
            sigma = torch.clamp(sigmas[i + 1], min=sigma_floor)
            x_in = x * (input_scale(sigmas[i]) / input_scale(sigma)).reshape(())   # 0-dim: keeps x's dtype
            if i in features_at:
                features_only(i)
        own = formula == "current_sigma" and i in features_at
        with keep_features(i, False) if own else nullcontext():
            denoised = model(x_in, sigma * s_in, **extra_args)
        eps = (x_in - denoised) / sigma
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma, "denoised": denoised})
        x = x + (sigmas[i + 1] - sigmas[i]) * eps
        if record is not None:
            record(i + 1, x)
    if len(sigmas) - 1 in features_at:
        features_only(len(sigmas) - 1)
    return x


def invert(model: Any, samples: torch.Tensor, conditioning: list, steps: int, scheduler: str, multiple: int = 1,
           formula: str = DEFAULT_FORMULA) -> tuple[torch.Tensor, Inversion]:
    """Invert raw-space latents ``samples`` (F, C, h, w); returns raw-space x_T and the INVERSION.

    Exactly ``steps`` sampling steps on ``host.inversion_sigma_grid`` (ddim_uniform: diffusers' DDIM timesteps).
    With ``multiple`` > 1 the inversion walks ``steps·multiple`` steps (each sampling step split evenly in the model's
    timestep: the papers invert with more steps than they sample, TokenFlow 500 for 50) and keeps the source only
    at the ``steps``-step sampling grid's σ; x_T is at that grid's top σ, so the edit samples the same grid.
    ``formula`` (``FORMULAS``): where each step evaluates ε̂, see ``sample_ddim_inversion``.
    """
    validation.integer(steps, "steps", 2)
    validation.integer(multiple, "inversion_multiple", 1)
    validation.choice(scheduler, "scheduler", host.scheduler_names())
    validation.choice(formula, "formula", FORMULAS)
    validation.model(model, patched=False)
    validation.latent({"samples": samples}, "latent")
    validation.latent_for_model(samples, model, "latent")
    weights = host.weights_fingerprint(model)                       # the weights an edit must run
    sigmas = host.inversion_sigma_grid(model, scheduler, steps)     # descending, ends with 0
    fine = host.subdivided_grid(model, sigmas, multiple)            # descending, contains every σ of ``sigmas``
    kept = {int(torch.argmin((fine - s).abs())): i for i, s in enumerate(sigmas)}   # fine index → grid index
    ascending = fine.flip(0)
    keep = host.intermediate_device()
    dtype = storage_dtype(host.model_dtype(model))
    latents = torch.empty((len(sigmas),) + tuple(samples.shape), dtype=dtype, device=keep)
    trace = torch.empty((len(sigmas), samples.shape[0], min(validation.FINGERPRINT_SAMPLES, samples[0].numel())))

    def record(i: int, x: torch.Tensor) -> None:                    # i counts up the ascending fine grid
        validation.finite(x, "model", f" in the latent it inverted to at step {i} of {len(fine) - 1} (fp16 "
                          "overflow? try --force-fp32 or a bf16/fp32 UNet)")
        grid_index = kept.get(len(fine) - 1 - i)
        if grid_index is not None:
            latents[grid_index] = x.detach().to(keep, dtype)
            trace[grid_index] = validation.fingerprint(x)

    stored = stack_of(model).stored_source(model, steps)          # FLATTEN's stored mode: the features it keeps
    m = for_inversion(model, stored)
    options = {"sigma_floor": host.sigma_min(model), "record": record, "formula": formula,
               "input_scale": host.input_scale(model)}
    if stored is not None:
        grid_step = {len(fine) - 1 - f: i for f, i in kept.items()}          # ascending fine index → grid step
        options["features_at"] = {a for a, i in grid_step.items() if i < stored.steps}
        options["keep_features"] = lambda a, features_only: stored.recording_at(grid_step[a], features_only)
    x_T = host.sample_with(m, sample_ddim_inversion, options, ascending, conditioning, samples,
                           callback=host.step_callback(len(fine) - 1))
    return x_T, Inversion(sigmas=sigmas, latents=latents, conditioning=conditioning, family=host.model_family(model),
                          sampling=host.effective_sampling(model), source=validation.fingerprint(samples),
                          trace=trace, weights=weights, stored=stored)


def invert_latent(model: Any, latent: dict, conditioning: list, steps: int, scheduler: str, multiple: int = 1,
                  formula: str = DEFAULT_FORMULA) -> tuple[torch.Tensor, Inversion]:
    """DDIM Inversion (TVE) of a LATENT: its samples and, where set, its noise_mask (a masked edit samples x_T with
    it) checked first."""
    samples = validation.latent(latent, "latent")
    validation.noise_mask(latent.get("noise_mask"), samples.shape, "latent")
    return invert(model, samples, conditioning, steps, scheduler, multiple, formula)
