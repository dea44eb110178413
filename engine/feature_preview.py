"""Preview Features (TVE): the source's self-attention features as pictures — their PCA per frame (TokenFlow
Fig. 3) and each frame rebuilt from its nearest keyframe through the nearest-neighbour field TokenFlow uses (§3.1).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..attention.tokenflow import pair_nearest_neighbour_field
from . import host, identity, validation
from .inversion import Inversion
from .stack import for_inversion

FEATURE_BLOCKS = ["output latent", "output latent/2", "output latent/4", "middle", "input latent",
                  "input latent/2", "input latent/4"]


def source_features(model: Any, inversion: Inversion, step: int, block: host.AttentionBlock) -> torch.Tensor:
    """The normed self-attention input of ``block`` for the source video at grid step ``step``: (F, T, C)."""
    captured: dict[str, torch.Tensor] = {}

    def capture(n, context, value, extra_options):
        if host.block_key(extra_options) == block.key:
            captured["n"] = n.detach()
        return n, context, value

    def evaluate_once(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        return x

    m = for_inversion(model)
    host.ensure_attn1_patch(m, capture)
    sigma = max(float(inversion.sigmas[step]), host.sigma_min(model))
    latent = host.process_latent_out(model, inversion.latents[step].float())
    host.sample_with(m, evaluate_once, {}, torch.tensor([sigma, 0.0]), inversion.conditioning, latent)
    return validation.finite(captured["n"], "model", f" in its features of the source at step {step} (fp16 "
                             "overflow in the UNet? try --force-fp32)")


def pca_image(features: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
    """(F, T, C) → (F, h, w, 3): the first 3 principal components of all frames' tokens, jointly min-max scaled.
    Fewer tokens or channels than 3 give as many components as there are (the rest stay 0)."""
    x = features.float().reshape(-1, features.shape[-1])
    x = x - x.mean(0)
    q = min(3, *x.shape)
    p = torch.zeros(x.shape[0], 3, device=x.device)
    if q > 0 and bool(x.abs().amax() > 0):          # all tokens equal (a single token): nothing varies
        _, _, v = torch.pca_lowrank(x, q=q, center=False)
        p[:, :q] = x @ v[:, :q]
    p = (p - p.amin(0)) / (p.amax(0) - p.amin(0)).clamp(min=1e-8)
    return p.reshape(features.shape[0], *grid_hw, 3)


def nn_field_image(features: torch.Tensor, colours: torch.Tensor, interval: int) -> torch.Tensor:
    """Each frame's tokens coloured by their nearest neighbour in the nearest keyframe (every ``interval``-th
    frame): where correspondences are right, this looks like the frame's own PCA picture."""
    frames = features.shape[0]
    keyframes = torch.arange(0, frames, interval)
    nearest = keyframes[(torch.arange(frames)[:, None] - keyframes[None]).abs().argmin(1)]      # (F,)
    local = torch.searchsorted(keyframes, nearest)                                             # (F,)
    field = pair_nearest_neighbour_field(features, features[keyframes], torch.stack([local, local], 1))[:, 0]
    keyframe_colours = colours.reshape(frames, -1, 3)[keyframes]                               # (K, T, 3)
    return keyframe_colours[local[:, None], field].reshape(colours.shape)                      # (F, h, w, 3)


def pick_block(model: Any, choice: str) -> host.AttentionBlock:
    part, _, grid = choice.partition(" ")
    level = {"": None, "latent": 0, "latent/2": 1, "latent/4": 2}[grid]
    blocks = [b for b in host.attention_blocks(model) if b.key[0] == part and (level is None or b.level == level)]
    if not blocks:
        raise ValueError(f"block: this model has no self-attention at '{choice}'")
    return blocks[-1] if part == "output" else blocks[0]


def preview_features(model: Any, inversion: Inversion, step_percent: float, block: str, keyframe_interval: int,
                     scale: int, allow_other_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """Preview Features (TVE): the PCA picture of the source's self-attention input of ``block`` at the grid step
    nearest ``step_percent`` (F, h·scale, w·scale, 3), each frame rebuilt from its nearest keyframe through the
    nearest-neighbour field, and the note to show where ``allow_other_weights`` let a model of other weights than
    the inversion's through (else refused)."""
    validation.model(model)
    validation.number(step_percent, "step_percent", 0.0, 1.0)
    validation.choice(block, "block", FEATURE_BLOCKS)
    validation.integer(keyframe_interval, "keyframe_interval", 1)
    validation.integer(scale, "scale", 1)
    validation.boolean(allow_other_weights, "allow_other_weights")
    validation.inversion_fits_model(inversion, model)
    note = validation.inversion_weights(inversion, host.weights_fingerprint(model), str(identity.PREVIEW_FEATURES),
                                        allow_other_weights)
    chosen = pick_block(model, block)
    steps = len(inversion.sigmas) - 1
    step = min(steps - 1, round(step_percent * steps))
    features = source_features(model, inversion, step, chosen)
    h, w = inversion.latent_shape[-2:]
    grid = (-(-h // 2 ** chosen.level), -(-w // 2 ** chosen.level))
    pca = pca_image(features, grid)
    field = nn_field_image(features, pca, keyframe_interval)
    up = lambda img: F.interpolate(img.permute(0, 3, 1, 2), scale_factor=scale, mode="nearest").permute(0, 2, 3, 1)
    device = host.intermediate_device()
    return up(pca).to(device), up(field).to(device), note
