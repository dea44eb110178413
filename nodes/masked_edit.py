"""Masked edits on an inverted latent: outside the LATENT's ``noise_mask`` the video follows its own inversion.

Core samplers blend the region outside the mask with ``latent_image + σ·noise`` at every step and with
``latent_image`` at the end (inpainting from a clean latent). With an inversion the latent is x_T and there is no
noise, so that region would be x_T throughout and at the end. Here it is the inverted source at the step's σ
(the INVERSION's latent there) during sampling, and the source at the last σ of the run afterwards, so only the
masked region changes (the same blend core uses, with the source's trajectory instead of a re-noised latent).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from . import host
from .inversion import Inversion


class MaskedSource:
    """The inpaint latent and the end-of-run blend of one patched MODEL (shared by its clones)."""

    def __init__(self, inversion: Inversion):
        self.inversion = inversion

    def __deepcopy__(self, memo: dict) -> "MaskedSource":
        return self

    def latent_at(self, sigma: torch.Tensor, noise: torch.Tensor = None, latent_image: torch.Tensor = None,
                  x: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Model-space source at σ (F, C, h, w): what lies outside the mask at this step."""
        i = self.inversion.index_of(float(sigma.reshape(-1)[0]))
        like = latent_image if latent_image is not None else x
        return self.inversion.latents[i].to(like.device, like.dtype)

    def outer_sample(self, executor: Callable, noise: torch.Tensor, latent_image: torch.Tensor, sampler: Any,
                     sigmas: torch.Tensor, denoise_mask: torch.Tensor | None = None, *args: Any,
                     **kwargs: Any) -> torch.Tensor:
        out = executor(noise, latent_image, sampler, sigmas, denoise_mask, *args, **kwargs)   # raw, float32
        if denoise_mask is None:
            return out
        model = host.sampling_model(executor)
        mask = host.prepare_mask(denoise_mask, out.shape, out.device)
        source = self.inversion.latents[self.inversion.index_of(float(sigmas[-1]))]
        source = host.process_latent_out(model, source.to(out.device, torch.float32))
        return out * mask + source * (1 - mask)


def follow_source_outside_mask(m: Any, inversion: Inversion) -> None:
    """Make a masked sampling run of the clone ``m`` keep ``inversion``'s source outside the mask."""
    masked = MaskedSource(inversion)
    host.set_inpaint_latent(m, masked.latent_at)
    host.add_wrapper(m, host.OUTER_SAMPLE, masked.outer_sample)
