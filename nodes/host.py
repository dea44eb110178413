"""The one adapter between TVE and ComfyUI: everything host-specific that the nodes need.

Nothing outside ``nodes/`` imports comfy. The node modules use only what this file exposes, which keeps the
host surface small enough for the test suite's stand-in host to mirror it faithfully.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.utils
import folder_paths
from comfy.ldm.modules import attention as comfy_attention

OPTICAL_FLOW_FOLDER = "optical_flow"
WRAPPER_KEY = "text_video_edit"
APPLY_MODEL = comfy.patcher_extension.WrappersMP.APPLY_MODEL
OUTER_SAMPLE = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
CALC_COND_BATCH = comfy.patcher_extension.WrappersMP.CALC_COND_BATCH


# ---------------------------------------------------------------------------------------------- model files
def register_optical_flow_folder() -> None:
    """Add ``models/optical_flow``, keeping paths the artist set in extra_model_paths.yaml (read earlier)."""
    default = os.path.join(folder_paths.models_dir, OPTICAL_FLOW_FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.get(OPTICAL_FLOW_FOLDER, ([], None))
    folder_paths.folder_names_and_paths[OPTICAL_FLOW_FOLDER] = (
        [default] + [p for p in paths if p != default], set(folder_paths.supported_pt_extensions))


def optical_flow_files() -> list[str]:
    return folder_paths.get_filename_list(OPTICAL_FLOW_FOLDER)


def optical_flow_folders() -> list[str]:
    return folder_paths.get_folder_paths(OPTICAL_FLOW_FOLDER)


def optical_flow_path(name: str) -> str:
    """Full path of ``models/optical_flow/<name>``; a ValueError saying where to put it if it is not there."""
    path = folder_paths.get_full_path(OPTICAL_FLOW_FOLDER, name)
    if path is None:
        raise ValueError(
            f"weights: '{name}' was not found in {optical_flow_folders()}; put a torchvision RAFT checkpoint "
            "there (raft_large_C_T_SKHT_V2-ff5fadd5.pth or raft_small_C_T_V2-01064c6d.pth) or use method 'dis'")
    return path


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """State dict of a weights file through comfy's safe loader (no pickled code)."""
    return comfy.utils.load_torch_file(path, safe_load=True)


# ---------------------------------------------------------------------------------------------- the VAE
def vae_downscale_ratio(vae: Any) -> int:
    """The spatial factor by which ``vae`` (a VAE socket value) encodes, whose multiples VAEEncode crops frames to
    (``VAE.vae_encode_crop_pixels``): 8 for SD1.x, SD2.x and SDXL."""
    if not getattr(vae, "crop_input", False) or not hasattr(vae, "spacial_compression_encode"):
        raise ValueError(f"vae: expected an image VAE (from a checkpoint or VAE loader), got a {type(vae).__name__} "
                         "that does not crop frames as VAEEncode does")
    return int(vae.spacial_compression_encode())


# ---------------------------------------------------------------------------------------------- devices, progress
def torch_device() -> torch.device:
    return comfy.model_management.get_torch_device()


def offload_device() -> torch.device:
    return comfy.model_management.unet_offload_device()


def intermediate_device() -> torch.device:
    return comfy.model_management.intermediate_device()


def free_memory_for(module: torch.nn.Module, working_bytes: int) -> torch.device:
    """Make room on the torch device for a helper ``module`` (its weights) and ``working_bytes`` of activations,
    offloading loaded models as comfy's own helper nodes do (``ImageUpscaleWithModel``); returns the device."""
    device = torch_device()
    comfy.model_management.free_memory(comfy.model_management.module_size(module) + working_bytes, device)
    return device


def helper_dtype(device: torch.device) -> torch.dtype:
    """float16 where the host runs half precision on ``device`` (GPUs), else float32 (the CPU)."""
    return torch.float16 if comfy.model_management.should_use_fp16(device) else torch.float32


def empty_cache() -> None:
    """Return the torch allocator's free blocks to the device (after an out-of-memory error)."""
    comfy.model_management.soft_empty_cache()


def progress(total: int) -> Callable[[int, int], None]:
    """A ``(done, total)`` callback that moves the node's progress bar and honours the cancel button."""
    bar = comfy.utils.ProgressBar(total)

    def update(done: int, total_: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, total_)

    return update


def report_progress_to(fn: Callable[[int, int], None] | None) -> None:
    """Send every progress-bar update of comfy and of the nodes to ``fn(done, total)`` (scripts run outside the
    server, which otherwise owns this hook); None stops."""
    comfy.utils.set_progress_bar_global_hook(
        None if fn is None else lambda value, total, preview=None, node_id=None: fn(value, total))


def preview_images(images: torch.Tensor, prefix: str) -> list[dict]:
    """Save ``images`` (N, H, W, 3) as the temporary PNGs core PreviewImage shows on a node; its ``ui.images``
    entries (filename, subfolder, type) for a node's ``{"ui": {"images": ...}}``."""
    import nodes
    return nodes.PreviewImage().save_images(images, filename_prefix=prefix)["ui"]["images"]


# ---------------------------------------------------------------------------------------------- attention blocks
@dataclass(frozen=True)
class AttentionBlock:
    """One BasicTransformerBlock of the UNet: its attn1 replace key and module path."""
    key: tuple[str, int, int]        # (block_name, block_id, block_index) as the host looks replaces up
    path: str                        # e.g. "diffusion_model.output_blocks.4.1.transformer_blocks.0"
    channels: int                    # inner dim of its self-attention (heads * dim_head)
    level: int                       # UNet resolution level: 0 = latent resolution, 1 = /2, ...


_GROUPS = (("input", "input_blocks"), ("middle", "middle_block"), ("output", "output_blocks"))


def attention_blocks(model: Any) -> list[AttentionBlock]:
    """Every self-attention block of the model's UNet, enumerated from the actual modules (SD1.x, SD2.x, SDXL)."""
    unet = model.get_model_object("diffusion_model")
    if not all(hasattr(unet, attr) for _, attr in _GROUPS):
        raise ValueError(f"model: {type(unet).__name__} is not a UNet with input/middle/output blocks; "
                         "TVE supports SD1.x, SD2.x and SDXL models")
    blocks = []
    levels = _block_levels(unet)
    for name, attr in _GROUPS:
        seqs = [getattr(unet, attr)] if name == "middle" else list(getattr(unet, attr))
        for block_id, seq in enumerate(seqs):
            for li, layer in enumerate(seq):
                if not isinstance(layer, comfy_attention.SpatialTransformer):
                    continue
                prefix = f"diffusion_model.{attr}." + ("" if name == "middle" else f"{block_id}.")
                for j, tb in enumerate(layer.transformer_blocks):
                    blocks.append(AttentionBlock(
                        key=(name, block_id, j), path=f"{prefix}{li}.transformer_blocks.{j}",
                        channels=tb.attn1.to_q.out_features, level=levels[(name, block_id)]))
    if not blocks:
        raise ValueError("model: its UNet has no self-attention blocks; TVE supports SD1.x, SD2.x and SDXL models")
    return blocks


def _block_levels(unet: Any) -> dict[tuple[str, int], int]:
    """Resolution level of every UNet block, counted from the downsamplers/upsamplers actually present."""
    levels, level = {}, 0
    for i, seq in enumerate(unet.input_blocks):
        if any(type(layer).__name__ == "Downsample" for layer in seq):
            level += 1
        levels[("input", i)] = level
    levels[("middle", 0)] = level
    for i, seq in enumerate(unet.output_blocks):
        levels[("output", i)] = level
        if any(type(layer).__name__ == "Upsample" for layer in seq):
            level -= 1
    return levels


def optimized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        extra_options: Mapping[str, Any]) -> torch.Tensor:
    """The host's attention backend (SDPA / xformers / sage / sub-quadratic), looked up at call time."""
    return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                               transformer_options=extra_options)


# ---------------------------------------------------------------------------------------------- batch layout
@dataclass(frozen=True)
class CallLayout:
    """How one UNet call's batch is laid out: ``chunks`` conds, each holding the same ``frame_ids``."""
    chunks: int
    frame_ids: tuple[int, ...]       # global frame index of each local frame of a chunk
    grid_hw: tuple[int, int]         # token grid of the current block
    step: int                        # index of the current σ in the sampling schedule (-1 if unknown)


def call_layout(batch: int, extra_options: Mapping[str, Any]) -> CallLayout:
    """Read chunks, global frame ids, token grid and step from an attention patch's ``extra_options``."""
    chunks = len(extra_options["cond_or_uncond"])
    if batch % chunks:
        raise ValueError(f"attention batch {batch} is not a multiple of {chunks} cond chunks")
    frames = batch // chunks
    frame_ids = call_frame_ids(frames, extra_options)
    if len(frame_ids) != frames:
        raise ValueError(f"context window lists {len(frame_ids)} frames but the call holds {frames} per chunk")
    h, w = (int(s) for s in extra_options["activations_shape"][-2:])
    return CallLayout(chunks=chunks, frame_ids=frame_ids, grid_hw=(h, w), step=current_step(extra_options))


def call_frame_ids(frames: int, transformer_options: Mapping[str, Any]) -> tuple[int, ...]:
    """Global frame ids of a call's frames: set by a TVE pass over some frames, else the core context window's,
    else 0..frames-1."""
    if "tve_frame_ids" in transformer_options:
        return tuple(transformer_options["tve_frame_ids"])
    window = transformer_options.get("context_window")
    if window is not None:
        return tuple(int(i) for i in window.index_list)
    return tuple(range(frames))


def current_step(extra_options: Mapping[str, Any]) -> int:
    """Index of the σ being evaluated in ``sample_sigmas`` (nearest match), or -1 outside a sampling run."""
    sigmas = extra_options.get("sigmas")
    schedule = extra_options.get("sample_sigmas")
    if sigmas is None or schedule is None:
        return -1
    sigma = sigmas.reshape(-1)[0].float().cpu()
    return int(torch.argmin((schedule.float().cpu() - sigma).abs()))


def schedule_percent(extra_options: Mapping[str, Any]) -> float:
    """Fraction of the sampling schedule reached at the current step (0 at the first step)."""
    schedule = extra_options.get("sample_sigmas")
    step = current_step(extra_options)
    if step < 0 or schedule is None:
        return 0.0
    return step / max(1, len(schedule) - 1)


def attn1_replaces(model: Any) -> dict[tuple, Callable]:
    """The attn1 replaces already on ``model``, by replace key (what a new replace on that key would hide)."""
    return dict(model.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {}))


def set_attn1_replace(model: Any, fn: Callable, blocks: Sequence[AttentionBlock]) -> None:
    """Install ``fn(q, k, v, extra_options)`` as the attn1 replace of each block of ``model`` (a clone)."""
    for block in blocks:
        model.set_model_attn1_replace(fn, *block.key)


# ---------------------------------------------------------------------------------------------- sampling
def scheduler_names() -> list[str]:
    import comfy.samplers
    return list(comfy.samplers.SCHEDULER_NAMES)


def sigma_grid(model: Any, scheduler: str, steps: int) -> torch.Tensor:
    """The descending σ grid a core sampler would use (ends with 0), float32 on the CPU."""
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    return sigmas.float().cpu()


def sigma_min(model: Any) -> float:
    return float(model.get_model_object("model_sampling").sigma_min)


def model_family(model: Any) -> str:
    """e.g. 'SD15/EPS', 'SD20/V_PREDICTION', 'SDXL/EPS': what an INVERSION must be used with."""
    base = model.model
    return f"{type(base.model_config).__name__}/{base.model_type.name}"


def model_dtype(model: Any) -> torch.dtype:
    return model.model.get_dtype()


def process_latent_in(model: Any, samples: torch.Tensor) -> torch.Tensor:
    return model.model.process_latent_in(samples)


def process_latent_out(model: Any, samples: torch.Tensor) -> torch.Tensor:
    return model.model.process_latent_out(samples)


def sample_with(model: Any, sampler_function: Callable, extra_options: dict, sigmas: torch.Tensor,
                positive: list, latent: torch.Tensor, callback: Callable | None = None) -> torch.Tensor:
    """Run ``sampler_function`` (k-diffusion signature) through comfy's whole sampling stack with guidance 1
    and zero noise: every patch and wrapper on ``model`` is active, conds are encoded by the host."""
    import comfy.sample
    import comfy.samplers
    sampler = comfy.samplers.KSAMPLER(sampler_function, extra_options=extra_options)
    return comfy.sample.sample_custom(model, torch.zeros_like(latent), 1.0, sampler, sigmas, positive, positive,
                                      latent, callback=callback, disable_pbar=True)


def sample_euler_guided(model: Any, noise: torch.Tensor, latent: torch.Tensor, sigmas: torch.Tensor, positive: list,
                        negative: list, cfg: float, seed: int, callback: Callable | None = None) -> torch.Tensor:
    """Core Euler (DDIM, η = 0) with CFG over ``sigmas``: raw latent in, raw latent out, through comfy's whole
    sampling stack (the sampler a core KSampler runs)."""
    import comfy.sample
    import comfy.samplers
    return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, positive,
                                      negative, latent, callback=callback, disable_pbar=True, seed=seed)


def step_callback(steps: int) -> Callable[[int, Any, Any, int], None]:
    """Progress bar (and cancel) for a sampler run of ``steps`` steps, as core's samplers report it."""
    update = progress(steps)
    return lambda step, x0, x, total: update(step + 1, total)


def encode_conditioning(base_model: Any, conditioning: list, x: torch.Tensor) -> list[dict]:
    """CONDITIONING → the per-cond dicts ``calc_cond_batch`` takes, encoded for the BaseModel (cross-attn, SDXL's y)."""
    import comfy.sampler_helpers
    import comfy.samplers
    conds = comfy.sampler_helpers.convert_cond(conditioning)
    return comfy.samplers.encode_model_conds(base_model.extra_conds, conds, x, x.device, "positive")


def decoder_stages(model: Any) -> list[list[int]]:
    """Output block ids grouped by resolution stage, lowest resolution first (SD1.5: [[0,1,2],[3,4,5],...])."""
    levels = _block_levels(model.get_model_object("diffusion_model"))
    stages: dict[int, list[int]] = {}
    for (name, block_id), level in levels.items():
        if name == "output":
            stages.setdefault(level, []).append(block_id)
    return [sorted(stages[level]) for level in sorted(stages, reverse=True)]


def resblock_branch(model: Any, output_block: int) -> torch.nn.Module:
    """The residual branch (``out_layers``: norm, SiLU, dropout, conv2) of an output block's ResBlock: its output
    is the feature PnP and TokenFlow inject (after conv2, before the skip connection is added)."""
    resblock = model.get_model_object(f"diffusion_model.output_blocks.{output_block}.0")
    if not hasattr(resblock, "out_layers"):
        raise ValueError(f"model: output block {output_block} does not start with a ResBlock")
    return resblock.out_layers


def add_wrapper(model: Any, wrapper_type: str, fn: Callable) -> None:
    model.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, fn)
