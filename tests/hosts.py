"""Tiny SD1.5-, SD2- (v-prediction, linear proj) and SDXL-shaped models for the two test hosts.

``make_tiny_model(family)`` returns a ``ModelPatcher`` that the host adapter builds from comfy's own model configs
(``host.build_model``) with seeded random weights: with ``COMFYUI_PATH`` set a real comfy BaseModel, otherwise the
stand-in host's, a UNet with the same block layout (replace keys, token grids, channels), enough for node logic.
Conditioning and latents of the right shapes come from ``make_conditioning`` / ``make_latent``.
"""
from __future__ import annotations

import os

import torch
from torch import nn

REAL_HOST = bool(os.environ.get("COMFYUI_PATH"))
FAMILIES = ("sd15", "sd2", "sdxl")

# Block layouts shared by both hosts: 2 resolution levels, 32 channels, SD1.5 / SD2 with attention at every
# level, SDXL with none at the latent resolution and depth 2 below it (the real SDXL pattern, shrunk).
_UNET = {
    "sd15": dict(context_dim=768, use_linear_in_transformer=False, transformer_depth=[1, 1],
                 transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, adm_in_channels=None),
    "sd2": dict(context_dim=1024, use_linear_in_transformer=True, transformer_depth=[1, 1],
                transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, adm_in_channels=None),
    "sdxl": dict(context_dim=2048, use_linear_in_transformer=True, transformer_depth=[0, 2],
                 transformer_depth_output=[0, 0, 2, 2], transformer_depth_middle=2, adm_in_channels=2816,
                 num_classes="sequential"),
}
_COMMON = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4,
               out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=[1, 1],
               use_temporal_resblock=False, use_temporal_attention=False)
HEAD_CHANNELS = 8
_CONFIG = {"sd15": "SD15", "sd2": "SD20", "sdxl": "SDXL"}           # comfy's model config of each family


def unet_config(family: str, **overrides) -> dict:
    return {**_COMMON, **_UNET[family], **overrides}


def make_tiny_model(family: str = "sd15", seed: int = 0, **unet_overrides):
    """``unet_overrides`` change the shared layout (e.g. ``num_res_blocks=[2, 2]``, the 3-blocks-per-level input
    layout a T2I-Adapter expects); real host only."""
    from tve.engine import host
    if unet_overrides and not REAL_HOST:
        raise ValueError("unet_overrides: only the real host builds other layouts")
    model = host.build_model(_CONFIG[family], unet_config(family, num_heads=-1, num_head_channels=HEAD_CHANNELS,
                                                          **unet_overrides),
                             "V_PREDICTION" if family == "sd2" else "EPS")
    _init_weights(model.model, seed)
    model.model.eval()
    return model


def make_conditioning(family: str = "sd15", seed: int = 1, batch: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    dim = _UNET[family]["context_dim"]
    extra = {"pooled_output": torch.randn(batch, 1280, generator=g)} if family == "sdxl" else {}
    return [[torch.randn(batch, 77, dim, generator=g), extra]]


def make_vae():
    """An SD-family VAE socket value (downscale factor 8): comfy's VAE built from the keys that mark an SD VAE, on
    the meta device, without weights (its crop rule and factor are real, it encodes nothing); the stand-in's
    without a host."""
    import logging

    from tve.engine import host
    from .e2e.tiny_sd15 import _SD_VAE_MARKERS
    markers = {key: torch.empty(shape, device="meta") for key, shape in _SD_VAE_MARKERS.items()}
    logging.disable(logging.WARNING)                    # "Missing VAE keys": the markers are all it is given
    try:
        with torch.device("meta"):
            return host.vae_from_state_dict(markers)
    finally:
        logging.disable(logging.NOTSET)


def make_latent(frames: int = 4, height: int = 16, width: int = 16, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(frames, 4, height, width, generator=g)}


def _init_weights(module: nn.Module, seed: int) -> None:
    """Seeded weights (comfy's ops leave parameters uninitialised): unit norms, zero biases, fan-in scaled."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".norm" in name or "norm." in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)


def make_tiny_controlnet(family: str = "sd15", seed: int = 3, **unet_overrides):
    """Real host: a ControlNet (core's ControlNet around comfy's cldm ControlNet) with the tiny UNet's layout, seeded
    random weights, RGB hints."""
    from tve.engine import host
    return host.build_controlnet(unet_config(family, num_heads=-1, num_head_channels=HEAD_CHANNELS, **unet_overrides),
                                 lambda module: _init_weights(module, seed))


def make_tiny_t2i_adapter(channels=(32, 64), seed: int = 4):
    """Real host: a T2I-Adapter (core's T2IAdapter around comfy's Adapter) whose features fit a tiny UNet with
    ``num_res_blocks=[2, 2]`` (one feature every third input block, as SD1.5's)."""
    from tve.engine import host
    return host.build_t2i_adapter(channels, lambda module: _init_weights(module, seed))


def cond_chunks_split(model):
    """Real host: a clone of ``model`` on which core's ``_calc_cond_batch`` runs each cond chunk (uncond, cond) in
    its own UNet call, as when the device is nearly full. Through a public seam only: an object patch of the
    BaseModel's ``memory_required`` (what the sampler weighs against free memory before it batches conds) that says
    no two chunks fit; attention backends and everything else are untouched."""
    m = model.clone()
    m.add_object_patch("memory_required", lambda input_shape, cond_shapes={}: float("inf"))
    return m


def with_context_windows(model, length: int, overlap: int = 0):
    """Real host: core's Context Windows (Manual) node over the frame (batch) dimension, every other input at the
    node's default (dim 0, static standard schedule, pyramid fuse, and on 0.33+ ``causal_window_fix``).

    Core 0.3.64's ``IndexListContextHandler.set_step`` compares ``sample_sigmas`` with the whole per-frame timestep
    tensor, which fails for image models whose frames are the batch (fixed in later releases, which compare its
    first entry); on such a host the handler's ``set_step`` is given the first entry, which is what it means."""
    from tve.engine import host
    (m,) = host.run_core_node("ContextWindowsManual", model=model, context_length=length, context_overlap=overlap)
    handler = m.model_options["context_handler"]
    try:
        handler.set_step(torch.ones(2), {"transformer_options": {"sample_sigmas": torch.tensor([1.0, 0.5, 0.0])}})
    except RuntimeError:
        set_step = handler.set_step
        handler.set_step = lambda timestep, model_options: set_step(timestep.reshape(-1)[:1], model_options)
    return m


def core_context_handler(length: int, overlap: int, schedule: str = "standard_static", fuse: str = "pyramid"):
    """Real host: the context handler core's Context Windows (Manual) node puts on a MODEL's ``model_options`` with
    this schedule and fuse method; ``handler.context_schedule.func(frames, handler, model_options)`` are its
    windows, ``handler.fuse_method.func(n)`` the weights of a window of ``n`` frames."""
    from tve.engine import host
    (m,) = host.run_core_node("ContextWindowsManual", model=make_tiny_model("sd15"), context_length=length,
                              context_overlap=overlap, context_schedule=schedule, fuse_method=fuse)
    return m.model_options["context_handler"]


def context_window_calls(model, frames: int) -> list[tuple[int, ...]]:
    """The global frame ids of each call core's context handler on ``model`` (``with_context_windows``) makes over
    ``frames`` frames: its static standard windows, each preceded by the frame before it where the handler adds
    a causal frame (``causal_window_fix``, 0.33+ default)."""
    from tve.engine.frame_windows import overlapping_windows
    handler = model.model_options["context_handler"]
    windows = overlapping_windows(frames, handler.context_length, handler.context_overlap)
    causal = getattr(handler, "causal_window_fix", False)
    return [tuple(([w[0] - 1] if causal and w[0] > 0 else []) + w) for w in windows]
