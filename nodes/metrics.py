"""TVE_ConsistencyMetrics and TVE_PreviewFeatures: numbers and pictures that explain an edit.

Warp error and flicker: ``flow/consistency.py`` (Lai et al. 2018). Feature previews: the PCA of the source's
self-attention features per frame and the nearest-neighbour field to the nearest keyframe (TokenFlow §3.1, Fig. 3).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..attention.tokenflow import pair_nearest_neighbour_field
from ..flow.consistency import measure_consistency
from ..flow.estimate import FlowField
from ..flow.latent_crop import match_frames
from . import host, passes, sockets, validation
from .inversion import Inversion

CATEGORY = "video editing/TVE"
FEATURE_BLOCKS = ["output latent", "output latent/2", "output latent/4", "middle", "input latent",
                  "input latent/2", "input latent/4"]


class ConsistencyMetrics:
    DESCRIPTION = ("Temporal consistency of edited frames under the SOURCE video's flow: warp error ×10³ (Lai et al. "
                   "2018: frame t+1 warped into frame t, squared RGB error over non-occluded pixels, mean over "
                   "pairs) and a flicker index (mean change of mean intensity). Give the source frames too to see "
                   "the source's own floor.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE", {"tooltip": "The edited frames."}),
                             "flow": (sockets.FLOW, {"tooltip": "Optical flow of the source video."})},
                "optional": {"source_images": ("IMAGE", {"tooltip": "The source frames (for the floor)."})}}

    RETURN_TYPES = ("FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("warp_error_x1000", "flicker", "summary")
    FUNCTION = "measure"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY

    def measure(self, images: torch.Tensor, flow: FlowField, source_images: torch.Tensor | None = None):
        sockets.expect(flow, FlowField, "flow", sockets.FLOW)
        validation.flow(flow, "flow")
        edited = _measure(images, flow, "images")
        lines = [f"warp error ×10³: {edited.warp_error * 1e3:.3f}", f"flicker: {edited.flicker:.5f}"]
        if source_images is not None:
            source = _measure(source_images, flow, "source_images")
            ratio = edited.warp_error / source.warp_error if source.warp_error > 0 else float("inf")
            lines += [f"source warp error ×10³: {source.warp_error * 1e3:.3f} (edit/source {ratio:.2f}×)",
                      f"source flicker: {source.flicker:.5f}"]
        size = flow.crop.describe() if flow.crop is not None else f"{flow.width}x{flow.height}"
        lines.append(f"flow: {flow.method} at {size}, {flow.frames} frames")
        summary = "\n".join(lines)
        return {"ui": {"text": [summary]}, "result": (edited.warp_error * 1e3, edited.flicker, summary)}


def _measure(images: torch.Tensor, flow: FlowField, name: str):
    """Warp error and flicker of ``images`` under ``flow``: source-size frames are cropped as VAEEncode crops them,
    frames decoded from the latent are taken as they are (``flow/latent_crop.py``)."""
    validation.frames(images, name, 2)
    if flow.crop is not None:
        return measure_consistency(match_frames(images, flow.crop, flow.frames, name, "flow"), flow.forward,
                                   flow.occlusion)
    if images.ndim != 4 or tuple(images.shape[:3]) != (flow.frames, flow.height, flow.width):
        raise ValueError(f"{name}: {tuple(images.shape[:3])} (frames, height, width) differs from the flow's "
                         f"{(flow.frames, flow.height, flow.width)}; measure frames of the size the flow was "
                         "computed on")
    return measure_consistency(images, flow.forward, flow.occlusion)


# ---------------------------------------------------------------------------------------------- feature previews
def source_features(model: Any, inversion: Inversion, step: int, block: host.AttentionBlock) -> torch.Tensor:
    """The normed self-attention input of ``block`` for the source video at grid step ``step``: (F, T, C)."""
    captured: dict[str, torch.Tensor] = {}

    def capture(n, context, value, extra_options):
        if (*extra_options["block"], extra_options["block_index"]) == block.key:
            captured["n"] = n.detach()
        return n, context, value

    def evaluate_once(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        return x

    m = passes.for_inversion(model)
    m.set_model_attn1_patch(capture)
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


class PreviewFeatures:
    DESCRIPTION = ("What TokenFlow sees, shown on the node and returned: the PCA of the source video's "
                   "self-attention features per frame (similar colours = similar features) and each frame rebuilt "
                   "from its nearest keyframe through the nearest-neighbour field (where it matches the PCA picture, "
                   "propagation will be clean).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model the inversion was made with."}),
            "inversion": (sockets.INVERSION, {"tooltip": "From DDIM Inversion (TVE) of the source video."}),
            "step_percent": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "Where on the σ grid to look (0 = noisiest)."}),
            "block": (FEATURE_BLOCKS, {"default": "output latent",
                                       "tooltip": "Which self-attention block's input features to show."}),
            "keyframe_interval": ("INT", {"default": 8, "min": 1, "max": 1024,
                                          "tooltip": "Every this many frames is a keyframe of the NN-field picture."}),
            "scale": ("INT", {"default": 8, "min": 1, "max": 64, "tooltip": "Pixels per token in the pictures."}),
        }}

    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("features_pca", "nn_field")
    OUTPUT_NODE = True
    FUNCTION = "preview"
    CATEGORY = CATEGORY

    def preview(self, model, inversion: Inversion, step_percent: float, block: str, keyframe_interval: int,
                scale: int):
        sockets.expect(inversion, Inversion, "inversion", sockets.INVERSION)
        validation.model(model)
        validation.number(step_percent, "step_percent", 0.0, 1.0)
        validation.choice(block, "block", FEATURE_BLOCKS)
        validation.integer(keyframe_interval, "keyframe_interval", 1)
        validation.integer(scale, "scale", 1)
        inversion.check_model(model)
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
        pca, field = up(pca).to(device), up(field).to(device)
        shown = host.preview_images(pca, "tve_features_pca") + host.preview_images(field, "tve_nn_field")
        return {"ui": {"images": shown}, "result": (pca, field)}


NODES = {
    "TVE_ConsistencyMetrics": (ConsistencyMetrics, "Consistency Metrics (TVE)"),
    "TVE_PreviewFeatures": (PreviewFeatures, "Preview Features (TVE)"),
}
