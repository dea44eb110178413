"""The live source branch: per denoising step, the source video at the step's σ runs through the UNet with the
source conditioning just before the edit batch, so patches can read its features (PnP, Tumanyan et al. 2023 §4;
TokenFlow §3.2: the NN field and the injected features come from the inverted source at the same step).

Installed as a keyed CALC_COND_BATCH wrapper: the host has already split frames into context windows and will
encode conds, batch chunks by memory and run ControlNet for the edit pass. The pass being run is written into
``transformer_options["tve_pass"]`` ("source" / "edit"; "inversion" while TVE_DDIMInversion runs) for attention
patches, and into ``SourceBranch.pass_name`` for module hooks, which see no transformer_options.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from . import host, validation
from .inversion import Inversion
from .masked_edit import follow_source_outside_mask

ORDERS = ["sigma-matched", "clean-first"]


class SourceBranch:
    """Per-run state shared by the wrapper and the patches of one patched MODEL (survives ``clone()``)."""

    def __init__(self, inversion: Inversion, order: str):
        if order not in ORDERS:
            raise ValueError(f"order: expected one of {ORDERS}, got '{order}'")
        self.inversion = inversion
        self.order = order
        # (step, steps) -> run the source pass at this step? Set by the patch that reads the features.
        self.wants_source: Callable[[int, int], bool] = lambda step, steps: True
        # Passes to run between the source pass and the edit pass (TokenFlow's keyframe pass), called like the
        # wrapper itself: (executor, model, conds, x_in, timestep, model_options).
        self.extra_passes: list[Callable] = []
        self.reset()

    def reset(self) -> None:
        self.pass_name: str | None = None
        self.step = -1
        self.steps = 0
        self.frame_ids: tuple[int, ...] = ()
        self.pass_frames: torch.Tensor | None = None  # local indices (into the source pass) of a partial pass
        self.features: dict[Any, torch.Tensor] = {}   # per block / module: the source pass's features, (F, ...)

    def __deepcopy__(self, memo: dict) -> "SourceBranch":
        return self

    def source_frames(self, features: torch.Tensor) -> torch.Tensor:
        """The source pass's ``features`` (F, ...) restricted to the frames of the pass now running."""
        return features if self.pass_frames is None else features[self.pass_frames.to(features.device)]

    def source_index(self, sigma: float) -> int:
        """Grid index of the source latent used at σ: the same σ (papers), or mirrored (ComfyUI peers)."""
        i = self.inversion.index_of(sigma)
        return i if self.order == "sigma-matched" else len(self.inversion.sigmas) - 1 - i

    def wrapper(self, executor: Callable, model: Any, conds: list, x_in: torch.Tensor, timestep: torch.Tensor,
                model_options: dict) -> Any:
        options = model_options["transformer_options"]
        if options.get("tve_pass") == "inversion":
            return executor(model, conds, x_in, timestep, model_options)
        frame_ids = host.call_frame_ids(x_in.shape[0], options)
        validation.call_fits_inversion(x_in, frame_ids, options.get("context_window") is not None,
                                       self.inversion.frames, self.inversion.latent_shape)
        sigma = float(timestep.reshape(-1)[0])
        # Steps count on the inversion's grid, so a sampler started part-way keeps the schedule fractions.
        self.step, self.steps = self.inversion.index_of(sigma), len(self.inversion.sigmas) - 1
        self.frame_ids = frame_ids
        self.features.clear()
        if self.wants_source(self.step, self.steps):
            self._source_pass(executor, model, x_in, model_options, frame_ids, sigma)
        for extra_pass in self.extra_passes:
            extra_pass(executor, model, conds, x_in, timestep, model_options)
        self.pass_name = "edit"
        try:
            return executor(model, conds, x_in, timestep, with_pass(model_options, "edit"))
        finally:
            self.pass_name = None

    def _source_pass(self, executor: Callable, model: Any, x_in: torch.Tensor, model_options: dict,
                     frame_ids: Sequence[int], sigma: float) -> None:
        i = self.source_index(sigma)
        x_src = self.inversion.latents[i][list(frame_ids)].to(x_in.device, x_in.dtype)     # (F, C, h, w)
        source_sigma = max(float(self.inversion.sigmas[i]), float(model.model_sampling.sigma_min))
        t_src = torch.full((x_src.shape[0],), source_sigma, device=x_in.device, dtype=x_in.dtype)
        conds = host.encode_conditioning(model, self.inversion.conditioning, x_src)
        self.pass_name = "source"
        try:
            executor(model, [conds], x_src, t_src, with_pass(model_options, "source"))
        finally:
            self.pass_name = None


def with_pass(model_options: dict, name: str, frame_ids: Sequence[int] | None = None) -> dict:
    """A shallow copy of ``model_options`` whose transformer_options say which pass runs (and, for a pass over
    a subset of the frames, their global ids: attention patches read them instead of the context window)."""
    options = model_options.copy()
    options["transformer_options"] = {**model_options["transformer_options"], "tve_pass": name}
    if frame_ids is not None:
        options["transformer_options"]["tve_frame_ids"] = tuple(frame_ids)
    return options


def install_source_branch(model: Any, branch: SourceBranch) -> None:
    """Add the branch's CALC_COND_BATCH wrapper and an OUTER_SAMPLE wrapper that resets it for every run; the
    inversion's checks before the first step (validation.guard_sampling) and its source outside a noise_mask."""

    def outer_sample(executor: Callable, *args: Any, **kwargs: Any) -> Any:
        branch.reset()
        try:
            return executor(*args, **kwargs)
        finally:
            branch.reset()

    host.add_wrapper(model, host.CALC_COND_BATCH, branch.wrapper)
    host.add_wrapper(model, host.OUTER_SAMPLE, outer_sample)
    validation.guard_sampling(model, branch.inversion)
    follow_source_outside_mask(model, branch.inversion)
