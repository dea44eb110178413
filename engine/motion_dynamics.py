"""Motion Dynamics Latents (TVE): Text2Video-Zero's motion-dynamics start latents (T2V-Zero §3.1, Alg. 1 steps 1-5).

One x_T is denoised with the artist's model and CFG (DDIM, η = 0, which is Euler in σ-space) to σ_{t1} and on to
σ_{t0}. Frame k is frame 0's σ_{t0} latent translated by W_k, a global translation of k·δ (§3.1), and brought back to
σ_{t1} by the forward process; frame 0 keeps its own σ_{t1} latent, as the official pipeline does. Sampling all
frames on from σ_{t1} with anchor cross-frame attention (TVE_ApplyCrossFrameAttention, mode 'anchor', §3.2)
completes the method.

Motion unit: latent cells per frame (1 cell = 8 image pixels for SD1.x/2.x/SDXL); frame k shows frame 0's content
moved by k·(motion_x, motion_y), +x right, +y down. The official default (``motion_field_strength_x/y = 12``) is a
backward flow of +12 px per frame on a 512-px reference field that is then resized to the latent: frame k samples
frame 0 at x + 1.5·k cells at 512², i.e. content moves −1.5 cells per frame (up-left), and 12/512 of the frame per
frame at any other size (−3 cells at 1024²). The official warp samples nearest with reflection padding; here each
frame's shift is rounded to whole cells (what nearest sampling does) and uncovered borders take frame 0's content
mirrored at the edge (reflection padding), so no latent value is blurred.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..flow.warp import backward_warp
from . import host, identity, validation
from .stack import stack_of
OFFICIAL_MOTION = -1.5           # latent cells per frame: the official motion_field_strength 12 px at 512², see above


# ---------------------------------------------------------------------------------------------- host-free math
def round_half_away(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def mirrored(index: torch.Tensor, size: int) -> torch.Tensor:
    """Integer coordinates folded into [0, size) by edge-inclusive mirroring (−1 → 0, size → size−1), the
    reflection padding of ``grid_sample(..., padding_mode='reflection', align_corners=False)``."""
    folded = torch.remainder(index, 2 * size)
    return torch.where(folded < size, folded, 2 * size - 1 - folded)


def frame_shifts(frames: int, motion_x: float, motion_y: float) -> torch.Tensor:
    """(frames, 2) whole-cell shifts (x, y) of frame k: k·δ rounded half away from zero, long."""
    k = torch.arange(frames, dtype=torch.float64)[:, None]                  # (F, 1)
    delta = torch.tensor([[motion_x, motion_y]], dtype=torch.float64)       # (1, 2)
    return round_half_away(k * delta).long()


def translation_flow(frames: int, height: int, width: int, motion_x: float, motion_y: float,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """(frames, 2, h, w) backward flow, in cells, that makes frame k frame 0 translated by k·δ (T2V-Zero §3.1, W_k).

    Frame k samples frame 0 at the mirrored position of x − round(k·δ); every flow value is a whole number.
    """
    shifts = frame_shifts(frames, motion_x, motion_y).to(device)            # (F, 2)
    xs = torch.arange(width, device=device)
    ys = torch.arange(height, device=device)
    dx = mirrored(xs[None] - shifts[:, :1], width) - xs[None]               # (F, w)
    dy = mirrored(ys[None] - shifts[:, 1:], height) - ys[None]              # (F, h)
    return torch.stack([dx[:, None, :].expand(frames, height, width),
                        dy[:, :, None].expand(frames, height, width)], dim=1).float()


def translated_frames(latent: torch.Tensor, frames: int, motion_x: float, motion_y: float) -> torch.Tensor:
    """(1, C, h, w) latent → (frames, C, h, w): frame k is the latent translated by k·δ cells (frame 0 unchanged)."""
    if latent.ndim != 4 or latent.shape[0] != 1:
        raise ValueError(f"latent: expected one frame (1, C, h, w), got shape {tuple(latent.shape)}")
    _, c, h, w = latent.shape
    flow = translation_flow(frames, h, w, motion_x, motion_y, latent.device)           # whole cells, float32
    warped, _ = backward_warp(latent.expand(frames, c, h, w), flow)
    return warped


def forward_noise(x: torch.Tensor, sigma_from: float, sigma_to: float, noise: torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_{σ_to} | x_{σ_from}) in σ-space: x + sqrt(σ_to² − σ_from²)·ε (T2V-Zero Alg. 1, the
    DDPM forward from t0 to t1; the exact transition, where the official code's ᾱ product is off by one step)."""
    if sigma_to < sigma_from:
        raise ValueError(f"sigma_to: forward noising goes up, got σ {sigma_from} → {sigma_to}")
    return x + (sigma_to ** 2 - sigma_from ** 2) ** 0.5 * noise


def grid_positions(t0: int, t1: int, steps: int) -> tuple[int, int]:
    """T2V-Zero's t0 < t1, indices into the ascending list of a ``steps``-step schedule, as positions on the
    descending σ grid: (position of σ_{t1}, position of σ_{t0}), position = steps − 1 − index."""
    if not 0 <= t0 < t1 <= steps - 1:
        raise ValueError(f"t0, t1: expected 0 ≤ t0 < t1 ≤ {steps - 1} (step indices counted from the clean end of "
                         f"the {steps}-step schedule), got t0={t0}, t1={t1}")
    return steps - 1 - t1, steps - 1 - t0


# ---------------------------------------------------------------------------------------------- the recipe
@dataclass(frozen=True)
class MotionDynamics:
    """Every stage of T2V-Zero's motion dynamics, model-space latents on the host's intermediate device."""
    anchor_t1: torch.Tensor      # (1, C, h, w) frame 0 at σ_{t1}
    anchor_t0: torch.Tensor      # (1, C, h, w) frame 0 at σ_{t0}
    warped_t0: torch.Tensor      # (F, C, h, w) frame 0 at σ_{t0} translated by k·δ
    latents: torch.Tensor        # (F, C, h, w) the start latents at σ_{t1}: anchor_t1, then warped_t0[1:] re-noised
    raw_latents: torch.Tensor    # (F, C, h, w) ``latents`` in raw (VAE) space, for LATENT sockets
    sigmas: torch.Tensor         # descending σ grid from σ_{t1} to 0
    start_step: int              # position of σ_{t1} on the full grid (KSamplerAdvanced's start_at_step)


def motion_dynamics(model: Any, positive: list, negative: list, latent_shape: tuple[int, int, int], seed: int,
                    frames: int, motion_x: float, motion_y: float, steps: int, cfg: float, scheduler: str,
                    t0: int, t1: int) -> MotionDynamics:
    """T2V-Zero §3.1: start latents of ``frames`` frames at σ_{t1}, of ``latent_shape`` (C, h, w).

    Noise: a CPU ``torch.Generator`` seeded with ``seed`` draws x_T first, as comfy's ``prepare_noise`` does for a
    one-frame latent (so frame 0 follows a core KSampler's trajectory for this seed), then the re-noising ε of
    frames 1..F−1.
    """
    stack_of(model).check_new_frames(identity.MOTION_DYNAMICS)
    if frames < 1:
        raise ValueError(f"frames: expected at least 1 frame, got {frames}")
    if steps < 2:
        raise ValueError(f"steps: expected at least 2 steps, got {steps}")
    if scheduler not in host.scheduler_names():
        raise ValueError(f"scheduler: expected one of {host.scheduler_names()}, got '{scheduler}'")
    grid = host.sigma_grid(model, scheduler, steps)                         # descending, ends with 0
    p1, p0 = grid_positions(t0, t1, len(grid) - 1)    # ddim_uniform may give more steps than asked (6 → 7)
    sigma_t1, sigma_t0 = float(grid[p1]), float(grid[p0])

    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn((1,) + tuple(latent_shape), generator=g)              # (1, C, h, w)
    eps = torch.randn((frames - 1,) + tuple(latent_shape), generator=g)     # (F−1, C, h, w)

    update = host.progress(p0)
    raw_t1 = host.sample_euler_guided(model, x_T, torch.zeros_like(x_T), grid[:p1 + 1], positive, negative, cfg, seed,
                                 lambda i, x0, x, total: update(i + 1, p0))
    raw_t0 = host.sample_euler_guided(model, torch.zeros_like(x_T), raw_t1, grid[p1:p0 + 1], positive, negative, cfg,
                                 seed, lambda i, x0, x, total: update(p1 + i + 1, p0))

    anchor_t1 = host.process_latent_in(model, raw_t1)
    anchor_t0 = host.process_latent_in(model, raw_t0)
    warped_t0 = translated_frames(anchor_t0, frames, motion_x, motion_y)
    renoised = forward_noise(warped_t0[1:], sigma_t0, sigma_t1, eps.to(warped_t0))
    raw = torch.cat([raw_t1, host.process_latent_out(model, renoised)])
    return MotionDynamics(anchor_t1=anchor_t1, anchor_t0=anchor_t0, warped_t0=warped_t0,
                          latents=torch.cat([anchor_t1, renoised]), raw_latents=raw,
                          sigmas=grid[p1:].clone(), start_step=p1)


def motion_dynamics_latents(model: Any, positive: list, negative: list, latent: dict, seed: int, frames: int,
                            motion_x: float, motion_y: float, steps: int, cfg: float, scheduler: str, t0: int,
                            t1: int) -> MotionDynamics:
    """Motion Dynamics Latents (TVE), every input checked: the start latents of ``frames`` frames of the size of
    ``latent``."""
    validation.model(model)
    samples = validation.latent(latent, "latent", check_values=False)      # only its size is used
    validation.latent_for_model(samples, model, "latent")
    validation.integer(seed, "seed", 0)
    validation.integer(frames, "frames", 1)
    validation.number(motion_x, "motion_x")
    validation.number(motion_y, "motion_y")
    validation.integer(steps, "steps", 2)
    validation.number(cfg, "cfg", 0.0)
    validation.choice(scheduler, "scheduler", host.scheduler_names())
    validation.integer(t0, "t0", 0)
    validation.integer(t1, "t1", 1)
    result = motion_dynamics(model, positive, negative, tuple(samples.shape[1:]), seed, frames, motion_x,
                             motion_y, steps, cfg, scheduler, t0, t1)
    validation.finite(result.raw_latents, "model", " in the frames it denoised (fp16 overflow? try "
                      "--force-fp32 or a bf16/fp32 UNet)")
    return result
