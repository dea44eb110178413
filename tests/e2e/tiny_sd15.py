"""A checkpoint file that ComfyUI's CheckpointLoaderSimple loads as SD1.5: MODEL, CLIP and VAE, random weights.

The UNet is SD1.5's shrunk to two resolution levels of 320 channels with one ResBlock and one transformer each
(320 channels and 768-wide cross-attention are what ``SD15.matches`` needs; two levels give the two decoder
stages PnP injection picks its blocks from); the CLIP-L text encoder and the VAE are full size, so the
checkpoint holds every key a real SD1.5 file has under ``model.diffusion_model.``, ``cond_stage_model.`` and
``first_stage_model.``. Names and shapes come from comfy's own classes built on the meta device; the layout is
comfy's own ``state_dict_for_saving``. ``write_tiny_controlnet`` writes a ControlNet for that UNet the same way.
Outputs are meaningless; workflows run end to end.
"""
from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path

import safetensors.torch
import torch

UNET = dict(model_channels=320, channel_mult=[1, 1], num_res_blocks=[1, 1], transformer_depth=[1, 1],
            transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=768,
            use_linear_in_transformer=False, adm_in_channels=None, in_channels=4, out_channels=4,
            use_spatial_transformer=True, legacy=False, use_checkpoint=False, image_size=32,
            use_temporal_attention=False, use_temporal_resblock=False)

# Keys whose presence makes comfy.sd.VAE build the SD1.x/SD2.x AutoencoderKL (4 latent channels, 8x downscale).
_SD_VAE_MARKERS = {"decoder.conv_in.weight": (512, 4, 3, 3), "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
                   "post_quant_conv.weight": (4, 4, 1, 1)}


def checkpoint_shapes() -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint as a meta tensor, named as in an SD1.5 checkpoint file."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models

    meta = torch.device("meta")
    base = comfy.supported_models.SD15(dict(UNET)).get_model({}, "", device=meta)
    clip = comfy.sd1_clip.SD1ClipModel(device=meta, dtype=torch.float16)
    markers = {k: torch.empty(shape, device=meta) for k, shape in _SD_VAE_MARKERS.items()}
    logging.disable(logging.WARNING)                    # "Missing VAE keys": the markers are all it is given
    try:
        with meta:
            vae = comfy.sd.VAE(sd=markers)
    finally:
        logging.disable(logging.NOTSET)
    parts = dict(clip_state_dict=clip.state_dict(), vae_state_dict=vae.first_stage_model.state_dict())
    if "unet_state_dict" in inspect.signature(base.state_dict_for_saving).parameters:
        return base.state_dict_for_saving(base.diffusion_model.state_dict(), **parts)   # ComfyUI 0.33: passed in
    return base.state_dict_for_saving(**parts)                                      # 0.3.64: its own UNet


def random_weights(shapes: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """fp16 weights: matrices and kernels N(0, 1/fan_in), norm scales 1, biases 0 (keeps activations O(1))."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name].shape
        if len(shape) >= 2:
            w = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        else:
            w = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        weights[name] = w.half()
    return weights


def write_tiny_sd15(path: Path, seed: int = 0) -> Path:
    safetensors.torch.save_file(random_weights(checkpoint_shapes(), seed), str(path))
    return path


def controlnet_shapes() -> dict[str, torch.Tensor]:
    """Every tensor of an SD1.5 ControlNet (RGB hint) for the tiny UNet, as meta tensors named as in a ControlNet
    ``.pth``/``.safetensors`` file (``control_model.`` prefix): comfy's own ``comfy.cldm.cldm.ControlNet``."""
    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in UNET.items() if k not in ("out_channels", "transformer_depth_output",
                                                         "use_temporal_resblock", "use_temporal_attention")}
    control = comfy.cldm.cldm.ControlNet(hint_channels=3, num_heads=8, device=torch.device("meta"),
                                         operations=comfy.ops.disable_weight_init, **config)
    return {f"control_model.{name}": t for name, t in control.state_dict().items()}


def write_tiny_controlnet(path: Path, seed: int = 1) -> Path:
    """A ControlNet file that core ControlNetLoader loads and that fits the tiny SD1.5 checkpoint's UNet."""
    safetensors.torch.save_file(random_weights(controlnet_shapes(), seed), str(path))
    return path
