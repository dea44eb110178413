"""Where a latent's pixels lie in its frames: the centre crop core VAEEncode applies before encoding.

``comfy.sd.VAE.vae_encode_crop_pixels`` cuts each spatial side of size S to the largest multiple of the VAE's
downscale factor r, ``S // r * r``, dropping ``(S % r) // 2`` pixels at the top/left and the rest at the
bottom/right. A 426x240 frame becomes 424x240 for SD (r = 8) and a 53x30 latent; cell (i, j) of the latent covers
pixels ``[oy + r·i, oy + r·(i+1)) x [ox + r·j, ox + r·(j+1))`` of the frame. Every TVE node that meets frames of
one size and a latent, a flow or decoded frames of another lines them up through :class:`LatentCrop`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentCrop:
    """VAEEncode's crop of frames of size ``frame_hw`` for a VAE with spatial downscale factor ``ratio``."""
    frame_hw: tuple[int, int]        # (H, W) of the frames given to VAEEncode
    ratio: int                       # the VAE's spatial downscale factor (8 for SD1.x, SD2.x and SDXL)

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"ratio: expected a VAE downscale factor of at least 1, got {self.ratio}")
        (height, width), r = self.frame_hw, self.ratio
        if height < r or width < r:
            raise ValueError(f"frames: {width}x{height} (w x h) is smaller than one {r}x{r} latent cell")

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.frame_hw[0] // self.ratio, self.frame_hw[1] // self.ratio

    @property
    def crop_hw(self) -> tuple[int, int]:
        """(h·r, w·r): the size of the pixels VAEEncode encodes, which is also the size VAEDecode returns."""
        return self.latent_hw[0] * self.ratio, self.latent_hw[1] * self.ratio

    @property
    def offset(self) -> tuple[int, int]:
        """(top, left) pixels dropped by the crop."""
        return (self.frame_hw[0] % self.ratio) // 2, (self.frame_hw[1] % self.ratio) // 2

    def crop(self, x: torch.Tensor, dims: tuple[int, int]) -> torch.Tensor:
        """``x`` with its (height, width) axes ``dims`` of size ``frame_hw`` cut to ``crop_hw`` (a view)."""
        if (x.shape[dims[0]], x.shape[dims[1]]) != self.frame_hw:
            raise ValueError(f"expected {self.frame_hw} (h, w) along axes {dims}, got {tuple(x.shape)}")
        (top, left), (height, width) = self.offset, self.crop_hw
        return x.narrow(dims[0], top, height).narrow(dims[1], left, width)

    def crop_frames(self, images: torch.Tensor) -> torch.Tensor:
        """IMAGE frames (F, H, W, 3) → (F, h·r, w·r, 3), exactly the pixels VAEEncode encodes."""
        return self.crop(images, (1, 2))

    def describe(self) -> str:
        (h, w), (ch, cw) = self.frame_hw, self.crop_hw
        cropped = "" if (h, w) == (ch, cw) else f", cropped by the VAE to {cw}x{ch}"
        return f"{w}x{h}{cropped}"


def match_frames(images: torch.Tensor, crop: LatentCrop, frames: int, name: str, other: str) -> torch.Tensor:
    """``images`` (F, H, W, 3) lined up with a FLOW or TRAJECTORIES (``other``) made through ``crop``.

    Frames of the crop's frame size are cropped as VAEEncode crops them; frames already of the cropped size
    (decoded from the latent, or already cropped) pass unchanged. Anything else, or another frame count, is a
    ValueError naming ``name`` and ``other``.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name}: expected IMAGE frames (F, H, W, 3), got shape {tuple(images.shape)}")
    count, height, width, _ = images.shape
    if count != frames:
        raise ValueError(f"{name}: has {count} frames but the {other} spans {frames}; use frames of the same video")
    if (height, width) == crop.crop_hw:
        return images
    if (height, width) == crop.frame_hw:
        return crop.crop_frames(images)
    (ch, cw), (fh, fw) = crop.crop_hw, crop.frame_hw
    sizes = f"{fw}x{fh} or {cw}x{ch}" if (ch, cw) != (fh, fw) else f"{fw}x{fh}"
    raise ValueError(f"{name}: {width}x{height} (w x h) frames, but the {other} was computed on {crop.describe()} "
                     f"frames; give frames of {sizes} (the source frames, or frames decoded from their latent)")
