"""Masked edits on an inverted latent: outside the LATENT's ``noise_mask`` the video follows its own inversion.

Core samplers blend the region outside the mask with ``latent_image + σ·noise`` at every step and with
``latent_image`` at the end (inpainting from a clean latent). With an inversion the latent is x_T and there is no
noise, so that region would be x_T throughout and at the end. Here it is the inverted source at the step's σ
(the INVERSION's latent there, interpolated in σ between grid points as the source pass reads it) during
sampling, and the source at the last σ of the run afterwards, so only the masked region changes (the same blend
core uses, with the source's trajectory instead of a re-noised latent). The model's method stack installs both (engine/stack.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from . import host

if TYPE_CHECKING:
    from .inversion import Inversion


class MaskedSource:
    """The inpaint latent and the end-of-run blend of the MODELs that edit one inversion (shared by clones)."""

    def __init__(self, inversion: "Inversion"):
        self.inversion = inversion

    def __deepcopy__(self, memo: dict) -> "MaskedSource":
        return self

    def latent_at(self, sigma: torch.Tensor, noise: torch.Tensor = None, latent_image: torch.Tensor = None,
                  x: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Model-space source at σ (F, C, h, w): what lies outside the mask at this step."""
        like = latent_image if latent_image is not None else x
        source, _ = self.inversion.source_at(float(sigma.reshape(-1)[0]), range(self.inversion.frames))
        return source.to(like.device, like.dtype)

    def blend(self, model: Any, out: torch.Tensor, denoise_mask: torch.Tensor | None, sigma_end: float
              ) -> torch.Tensor:
        """A masked run's raw result ``out`` inside the mask, the source at the run's last σ outside it."""
        if denoise_mask is None:
            return out
        mask = host.prepare_mask(denoise_mask, out.shape, out.device)
        source, _ = self.inversion.source_at(sigma_end, range(self.inversion.frames))
        source = host.process_latent_out(model, source.to(out.device, torch.float32))
        return out * mask + source * (1 - mask)
