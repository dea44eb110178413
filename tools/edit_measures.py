"""How good is an edit of a procedural clip to the test model's ``target`` style? Four measures that blur and copying
cannot win together (``bench/consistency.py`` prints them as ratios to per-frame PnP).

All of them work on latent cells: the test latent space decodes each cell to one colour repeated over 8x8 pixels
(``tools/video_world.py``), so the cell colours ``cell_colours(latent)`` are the decoded frame, exactly. The target
style (``tools/train_test_model.py``) is ``recolour(frames)`` (a duotone of the luminance) plus stripes of a fixed
period ``P`` whose angle and phase the model draws per sample; ``P`` is given here in cells (pixels / 8).

- ``latent_warp_error``: frame t+1's latent backward-warped into frame t with the source flow, squared error summed
  over channels, mean over the cells no occluded pixel touches, mean over pairs. Flicker; blur lowers it.
- ``fidelity_error``: decoded output and the recoloured source, both averaged over ``P x P`` cells (one stripe
  period), mean squared error: the deterministic part of the style (colour and light/dark layout at a coarse scale).
- ``edit_strength``: the energy of the stripes the edit adds. Per frame, the output's grey (channel mean) minus its
  least-squares fit by an affine function of the source's cell colours ``a · rgb_src + b`` (what the source explains
  at any contrast and colour mix: the recolour and a copy alike), then the band-pass energy of that residual at the
  stripe period: spatial frequencies within a factor ``BAND`` (1.5) of ``1/P``, any angle, on the Hann-windowed
  frame; mean over frames. The exact style gives about ``A² / 2`` (A the stripe amplitude); blurring lowers it,
  blending two stripe draws halves it (unrelated phases), and a copy of the source or its recolour gives 0.
- ``structure_error``: the object layout kept. The grey of output and of the recoloured source with the stripe band
  removed (the same band, zeroed in the Fourier domain of a mirror-padded frame), then their gradients (forward
  differences between cells, both directions), per frame ``1 − cos²`` of the angle between the two gradient fields
  (the share of the source's edges the output's do not follow, at any contrast), mean over frames. Sprite edges are
  sharp, so their energy lies far outside the band; a blurred output loses them, an output that moves or drops a
  sprite loses that sprite's share, a flat output scores 1. Copying the source wins this one and loses edit
  strength.
- ``warp_error_parts``: where the flicker sits. The decoded output split per frame into what the source explains
  (the least-squares fit ``a · rgb_src + b`` per channel: the recolour, at any contrast), the stripe band of the rest
  and the rest outside the band, each measured like ``latent_warp_error`` (in the latent's units). Not a score:
  ``bench/diagnose.py`` prints it to show which part of an edit flickers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tve.flow.warp import backward_warp
from tve.tools.train_test_model import recolour
from tve.tools.video_world import LATENT_FROM_RGB, LATENT_SCALE, latent_to_frames

BAND = 1.5  # the stripe band: spatial frequencies in [1 / (BAND P), BAND / P]


def cell_colours(latent: torch.Tensor) -> torch.Tensor:
    """``(F, 4, h, w)`` raw test latents -> ``(F, h, w, 3)`` float32: the colour each cell decodes to."""
    frames = latent_to_frames(latent.float())  # (F, 8h, 8w, 3), constant over each 8x8 cell
    return frames[:, ::LATENT_SCALE, ::LATENT_SCALE]


def source_cells(frames: torch.Tensor) -> torch.Tensor:
    """``(F, H, W, 3)`` source frames -> ``(F, H/8, W/8, 3)``: their recolour, averaged over each cell (the
    recolour is affine, so this is what a perfect edit without stripes decodes to)."""
    styled = recolour(frames.float()).permute(0, 3, 1, 2)
    return F.avg_pool2d(styled, LATENT_SCALE).permute(0, 2, 3, 1)


def _band(height: int, width: int, period: float, device: torch.device) -> torch.Tensor:
    """``(height, width)`` bool: the FFT bins whose frequency is within a factor BAND of ``1 / period`` cycles/cell."""
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.fftfreq(width, device=device)[None, :]
    radius = torch.hypot(fy, fx) * period  # 1 at the stripe frequency
    return (radius >= 1 / BAND) & (radius <= BAND)


def band_energy(grey: torch.Tensor, period: float) -> torch.Tensor:
    """``(F, h, w)`` -> ``(F,)``: variance of the Hann-windowed frame's part in the stripe band (a pure sinusoid of
    amplitude A at the period gives about A² / 2)."""
    count, height, width = grey.shape
    window = torch.hann_window(height, periodic=False, dtype=grey.dtype)[:, None] * \
        torch.hann_window(width, periodic=False, dtype=grey.dtype)[None, :]  # (h, w)
    centred = grey - (grey * window).sum((1, 2), keepdim=True) / window.sum()
    spectrum = torch.fft.fft2(centred * window)  # (F, h, w)
    band = _band(height, width, period, grey.device)
    return (spectrum.abs() ** 2 * band).sum((1, 2)) / (height * width * (window ** 2).sum())


def unexplained_grey(latent: torch.Tensor, source_frames: torch.Tensor) -> torch.Tensor:
    """``(F, h, w)`` float64: the output's grey minus, per frame, its least-squares fit ``a · rgb_src + b`` by the
    source's cell colours."""
    grey = cell_colours(latent).mean(-1).double().flatten(1)  # (F, h·w)
    return (grey - fitted_by_source(grey[..., None], source_frames)[..., 0]).view(latent.shape[0], *latent.shape[-2:])


def fitted_by_source(values: torch.Tensor, source_frames: torch.Tensor) -> torch.Tensor:
    """Per frame, the least-squares fit ``a · rgb_src + b`` of ``values`` ``(F, h·w, k)`` float64 (each of the ``k``
    columns on its own) by the source's cell colours, ``source_frames`` ``(F, 8h, 8w, 3)`` -> ``(F, h·w, k)``."""
    rgb = F.avg_pool2d(source_frames.double().permute(0, 3, 1, 2), LATENT_SCALE).flatten(2).transpose(1, 2)
    basis = torch.cat([rgb, torch.ones_like(rgb[..., :1])], -1)  # (F, h·w, 4)
    return basis @ torch.linalg.lstsq(basis, values).solution


def edit_strength(latent: torch.Tensor, source_frames: torch.Tensor, period: float) -> float:
    """Stripe energy added by the edit: ``mean_f band_energy(unexplained_grey)`` (see the module text).
    ``latent`` ``(F, 4, h, w)`` raw, ``source_frames`` ``(F, 8h, 8w, 3)``, ``period`` in cells."""
    return float(band_energy(unexplained_grey(latent, source_frames), period).mean())


def without_band(grey: torch.Tensor, period: float) -> torch.Tensor:
    """``(F, h, w)`` with the stripe band zeroed: mirror-padded to ``(2h, 2w)`` (no wrap-around edges), FFT, band
    set to 0, inverse, cropped back."""
    height, width = grey.shape[-2:]
    padded = torch.cat([grey, grey.flip(-2)], -2)
    padded = torch.cat([padded, padded.flip(-1)], -1)  # (F, 2h, 2w), even about the frame's edges
    band = _band(2 * height, 2 * width, period, grey.device)
    kept = torch.fft.ifft2(torch.fft.fft2(padded) * ~band).real
    return kept[:, :height, :width]


def _gradients(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return image[:, 1:, :] - image[:, :-1, :], image[:, :, 1:] - image[:, :, :-1]


def structure_error(latent: torch.Tensor, source_frames: torch.Tensor, period: float) -> float:
    """Mean over frames of ``1 − cos²(∇ out, ∇ src)`` of the greys with the stripe band removed (module text)."""
    out = without_band(cell_colours(latent).mean(-1).double(), period)
    ref = without_band(source_cells(source_frames).mean(-1).double(), period)
    a = torch.cat([g.flatten(1) for g in _gradients(out)], 1)  # (F, gradients)
    b = torch.cat([g.flatten(1) for g in _gradients(ref)], 1)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)
    return float((1 - cos ** 2).mean())


def fidelity_error(latent: torch.Tensor, source_frames: torch.Tensor, period: float) -> float:
    """Mean squared error of output and recoloured source colours, both averaged over one stripe period
    (``ceil(period)`` cells each way)."""
    cells = math.ceil(period)

    def low_pass(colours: torch.Tensor) -> torch.Tensor:  # (F, h, w, 3) -> (F, 3, h/cells, w/cells)
        return F.avg_pool2d(colours.permute(0, 3, 1, 2), cells, ceil_mode=True)

    return float(((low_pass(cell_colours(latent)) - low_pass(source_cells(source_frames))) ** 2).mean())


def latent_flow(forward: torch.Tensor, occlusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel flow ``(F-1, 2, H, W)`` and occlusion ``(F-1, H, W)`` -> the flow averaged over each latent cell in
    cell units ``(F-1, 2, h, w)``, and the cells any occluded pixel touches ``(F-1, h, w)``."""
    cell_flow = F.avg_pool2d(forward, LATENT_SCALE) / LATENT_SCALE
    occluded = F.max_pool2d(occlusion.float()[:, None], LATENT_SCALE)[:, 0] > 0
    return cell_flow, occluded


def pair_warp_errors(latents: torch.Tensor, cell_flow: torch.Tensor, occluded: torch.Tensor) -> torch.Tensor:
    """Frame t+1 warped into frame t with the cell flow, squared error summed over channels, mean over the visible
    cells: one error per pair ``(F-1,)``. ``latents`` ``(F, C, h, w)`` (latents or per-cell features)."""
    x = latents.float()
    warped, valid = backward_warp(x[1:], cell_flow)
    visible = (valid & ~occluded).float()
    return (((warped - x[:-1]) ** 2).sum(1) * visible).sum((1, 2)) / visible.sum((1, 2)).clamp(min=1)


def warp_error_parts(latent: torch.Tensor, source_frames: torch.Tensor, period: float, cell_flow: torch.Tensor,
                     occluded: torch.Tensor) -> dict[str, float]:
    """The output's flicker split three ways (module text): ``explained`` (per frame and channel, the least-squares
    fit of the decoded cell colours by the source's ``a · rgb + b``), ``stripes`` (the rest's stripe band,
    ``period`` cells, mirror-padded as in ``structure_error``) and ``rest`` (the rest outside the band). Each part
    is mapped back to latent units (``LATENT_FROM_RGB``, no bias) and given its ``latent_warp_error``; unrelated
    parts add up to about the whole output's. ``latent`` ``(F, 4, h, w)`` raw, ``source_frames`` ``(F, 8h, 8w, 3)``."""
    colours = cell_colours(latent).double()  # (F, h, w, 3)
    explained = fitted_by_source(colours.flatten(1, 2), source_frames).view_as(colours)
    rest = colours - explained
    off_band = torch.stack([without_band(rest[..., c], period) for c in range(3)], -1)
    parts = {"explained": explained, "stripes": rest - off_band, "rest": off_band}
    to_latent = LATENT_FROM_RGB.to(colours.device)  # (4, 3)
    return {name: latent_warp_error(torch.einsum("fhwc,lc->flhw", part, to_latent), cell_flow, occluded)
            for name, part in parts.items()}


def latent_warp_error(latents: torch.Tensor, cell_flow: torch.Tensor, occluded: torch.Tensor) -> float:
    """``pair_warp_errors`` averaged over the pairs."""
    return float(pair_warp_errors(latents, cell_flow, occluded).mean())
