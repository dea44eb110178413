"""The one adapter between TVE and ComfyUI: everything host-specific that the nodes need.

Nothing outside ``nodes/`` imports comfy. The node modules use only what this file exposes, which keeps the
host surface small enough for the test suite's stand-in host to mirror it faithfully.
"""
from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.utils
import folder_paths
from comfy.ldm.modules import attention as comfy_attention
from comfy.ldm.modules.diffusionmodules import openaimodel

OPTICAL_FLOW_FOLDER = "optical_flow"
ADAPTER_FOLDER = "tve_adapters"
WRAPPER_KEY = "text_video_edit"      # keyed wrappers and the model attachment of TVE's per-model state
RUN_KEY = "text_video_edit_run"      # transformer_options entry: the sampling run's pass state (passes.Run)
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


def register_adapter_folder() -> None:
    """Add ``models/tve_adapters`` (temporal adapters, .safetensors), keeping paths from extra_model_paths.yaml."""
    default = os.path.join(folder_paths.models_dir, ADAPTER_FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.get(ADAPTER_FOLDER, ([], None))
    folder_paths.folder_names_and_paths[ADAPTER_FOLDER] = ([default] + [p for p in paths if p != default],
                                                           {".safetensors"})


def adapter_files() -> list[str]:
    return folder_paths.get_filename_list(ADAPTER_FOLDER)


def adapter_path(name: str) -> str:
    """Full path of ``models/tve_adapters/<name>``; ValueError naming the folders when it is not there."""
    path = folder_paths.get_full_path(ADAPTER_FOLDER, name)
    if path is None:
        raise ValueError(f"adapter_name: '{name}' was not found in {folder_paths.get_folder_paths(ADAPTER_FOLDER)}; "
                         "save one with Save Temporal Adapter (TVE)")
    return path


def new_adapter_path(prefix: str) -> str:
    """A free ``<prefix>_00001.safetensors`` path in the first tve_adapters folder (the one the loader lists)."""
    folder = folder_paths.get_folder_paths(ADAPTER_FOLDER)[0]
    base = os.path.normpath(os.path.join(folder, prefix))
    if os.path.commonpath([os.path.abspath(folder), os.path.abspath(base)]) != os.path.abspath(folder):
        raise ValueError(f"filename_prefix: '{prefix}' leaves the tve_adapters folder {folder}")
    os.makedirs(os.path.dirname(base), exist_ok=True)
    counter = 1
    while os.path.exists(f"{base}_{counter:05}.safetensors"):
        counter += 1
    return f"{base}_{counter:05}.safetensors"


def optical_flow_files() -> list[str]:
    return folder_paths.get_filename_list(OPTICAL_FLOW_FOLDER)


def optical_flow_folders() -> list[str]:
    return folder_paths.get_folder_paths(OPTICAL_FLOW_FOLDER)


RAFT_FILES = "raft_large_C_T_SKHT_V2-ff5fadd5.pth or raft_small_C_T_V2-01064c6d.pth"


def optical_flow_path(name: str) -> str:
    """Full path of ``models/optical_flow/<name>``; a ValueError naming ``raft_weights`` and saying where to put
    it if it is not there."""
    path = folder_paths.get_full_path(OPTICAL_FLOW_FOLDER, name)
    if path is None:
        raise ValueError(f"raft_weights: '{name}' was not found in {optical_flow_folders()}; put a torchvision "
                         f"RAFT checkpoint there ({RAFT_FILES}) or use method 'dis'")
    return path


def load_weights(path: str) -> dict[str, torch.Tensor]:
    """State dict of a RAFT weights file through comfy's safe loader (no pickled code); an empty, unreadable or
    pickled file is one ValueError naming ``raft_weights`` and saying what the file is."""
    name = os.path.basename(path)
    if os.path.getsize(path) == 0:
        raise ValueError(f"raft_weights: '{name}' is an empty file (0 bytes), not a RAFT checkpoint; download "
                         f"{RAFT_FILES} again into {os.path.dirname(path)}")
    try:
        state = comfy.utils.load_torch_file(path, safe_load=True)
    except pickle.UnpicklingError as e:           # the weights-only unpickler met Python objects it will not run
        raise ValueError(f"raft_weights: '{name}' holds pickled Python objects besides tensors, which TVE will "
                         f"not load (unsafe, and not a torchvision RAFT state dict); use {RAFT_FILES}") from e
    except Exception as e:                         # truncated zip, EOFError, a corrupt safetensors header, ...
        raise ValueError(f"raft_weights: '{name}' could not be read as a checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no message'}); it is damaged or not a RAFT "
                         f"checkpoint; use {RAFT_FILES}") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"raft_weights: '{name}' is not a state dict of tensors; use {RAFT_FILES}")
    return state


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


def helper_model(module: torch.nn.Module) -> Any:
    """A ModelPatcher around a helper ``module`` (RAFT), made once per module: what core's own loaders wrap such a
    module in (core's Load Optical Flow Model, its upscale-model loader), so core's model management loads it."""
    patcher = _HELPER_PATCHERS.get(id(module))
    if patcher is None or patcher.model is not module:
        import comfy.model_patcher
        patcher = comfy.model_patcher.ModelPatcher(module, load_device=torch_device(), offload_device=offload_device())
        _HELPER_PATCHERS.clear()                          # the last helper only: it holds its module's weights
        _HELPER_PATCHERS[id(module)] = patcher
    return patcher


_HELPER_PATCHERS: dict[int, Any] = {}


def helper_module(value: Any) -> torch.nn.Module | None:
    """The module of a helper MODEL socket value (a ModelPatcher from a core loader, e.g. OPTICAL_FLOW), or None."""
    module = getattr(value, "model", None)
    return module if isinstance(module, torch.nn.Module) and hasattr(value, "load_device") else None


def load_helper(patcher: Any, working_bytes: int) -> torch.nn.Module:
    """Load a helper's ModelPatcher onto the torch device the way core's helper nodes do (``load_models_gpu`` with
    its working memory: core frees what it needs, offloading other models, and offloads this one when it needs the
    room later); its module, on its load device."""
    comfy.model_management.load_models_gpu([patcher], memory_required=working_bytes, force_full_load=True)
    return patcher.model


def helper_loaded(patcher: Any) -> bool:
    """Whether core's model management holds ``patcher`` loaded."""
    return any(loaded is patcher for loaded in comfy.model_management.loaded_models())


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


def progress_with_text(total: int) -> Callable[[int, int, str], None]:
    """Like ``progress``, and shows ``text`` (e.g. the loss) on the running node when a server is attached."""
    update = progress(total)
    node_id = _executing_node_id()

    def update_with_text(done: int, total_: int, text: str) -> None:
        update(done, total_)
        if node_id is not None:
            from server import PromptServer
            PromptServer.instance.send_progress_text(text, node_id)

    return update_with_text


def _executing_node_id() -> str | None:
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:                                   # the host's in-process tests and the stand-in have none
        return None
    context = get_executing_context()
    if context is None or getattr(PromptServer, "instance", None) is None:
        return None
    return context.node_id


# ---------------------------------------------------------------------------------------------- core nodes
def core_node_class(node_id: str) -> type:
    """The class of a core node by its id (``NODE_CLASS_MAPPINGS``, the registry the graph editor uses), loading
    core's ``comfy_extras`` nodes first where the process has not (a script or test outside the server)."""
    import nodes
    if node_id not in nodes.NODE_CLASS_MAPPINGS:
        import asyncio
        import inspect
        loading = nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False)
        if inspect.iscoroutine(loading):              # async since 0.3.4x
            asyncio.run(loading)
    if node_id not in nodes.NODE_CLASS_MAPPINGS:
        raise ValueError(f"ComfyUI has no core node '{node_id}'")
    return nodes.NODE_CLASS_MAPPINGS[node_id]


def run_core_node(node_id: str, **inputs: Any) -> tuple:
    """Run a core node as the executor runs a freshly added one: the ``inputs`` given, every other widget at the
    default the node declares (so a release that adds an input runs it at its default); its output tuple."""
    cls = core_node_class(node_id)
    declared = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in declared.get(section, {}).items():
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            choices = spec[0] if isinstance(spec[0], list) else options.get("options")
            if name in inputs:
                continue
            if "default" in options:
                inputs[name] = options["default"]
            elif choices:                                 # a combo without a default starts on its first choice
                inputs[name] = choices[0]
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    return tuple(getattr(out, "result", out))         # a V3 node's NodeOutput, or a V1 node's tuple


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
        if any(isinstance(layer, openaimodel.Downsample) for layer in seq):
            level += 1
        levels[("input", i)] = level
    levels[("middle", 0)] = level
    for i, seq in enumerate(unet.output_blocks):
        levels[("output", i)] = level
        if any(isinstance(layer, openaimodel.Upsample) for layer in seq):
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
    """Global frame ids of a call's frames: those of the TVE pass now running (``passes.Run.pass_frame_ids``, which
    the pass wrapper puts under ``RUN_KEY``), else the core context window's, else 0..frames-1."""
    run = transformer_options.get(RUN_KEY)
    ids = getattr(run, "pass_frame_ids", None)
    if ids is not None:
        return tuple(ids)
    window = transformer_options.get("context_window")
    if window is not None:
        return context_window_frame_ids(window)
    return tuple(range(frames))


def context_window_frame_ids(window: Any) -> tuple[int, ...]:
    """Global frame ids of the frames a core context window's call holds, in call order: its ``index_list``,
    preceded by the causal frame core 0.33+ prepends (``causal_window_fix``, on by default: the frame before the
    window, whose output core drops after the call)."""
    ids = tuple(int(i) for i in window.index_list)
    anchor = getattr(window, "causal_anchor_index", None)
    if anchor is not None and anchor >= 0:
        ids = (int(anchor),) + ids
    return ids


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


def set_attn1_replace(model: Any, fn: Callable, keys: Iterable[tuple[str, int, int]]) -> None:
    """Install ``fn(q, k, v, extra_options)`` as the attn1 replace of each block key of ``model`` (a clone)."""
    for key in keys:
        model.set_model_attn1_replace(fn, *key)


def set_middle_patch(model: Any, fn: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]) -> None:
    """Install ``fn(x, extra_options) -> x`` on ``model`` (a clone): every BasicTransformerBlock calls it on its
    hidden state ``(batch, T, C)`` right after the self-attention residual, before cross-attention."""
    model.set_model_patch(fn, "middle_patch")


def block_key(extra_options: Mapping[str, Any]) -> tuple[str, int, int]:
    """The (block_name, block_id, block_index) of the transformer block a patch is called from."""
    name, block_id = extra_options["block"]
    return name, int(block_id), int(extra_options.get("block_index", 0))


def attention_heads(model: Any, block: AttentionBlock) -> int:
    return int(model.get_model_object(f"{block.path}.attn1").heads)


def query_weight_keys(block: AttentionBlock) -> tuple[str, str]:
    """State-dict keys of a block's self- and cross-attention query projections (Tune-A-Video's trainable set)."""
    return f"{block.path}.attn1.to_q.weight", f"{block.path}.attn2.to_q.weight"


def add_weight_diffs(model: Any, diffs: Mapping[str, torch.Tensor]) -> None:
    """Add ``W + diff`` weight patches to ``model`` (a clone; the base weights stay as they are)."""
    missing = [key for key in diffs if key not in model.model_state_dict()]
    if missing:
        raise ValueError(f"adapter: the model has no weights {missing[:3]}; the adapter was made for another model")
    model.add_patches({key: (diff,) for key, diff in diffs.items()}, 1.0, 1.0)


def ensure_attn1_patch(model: Any, fn: Callable) -> None:
    """Add ``fn(n, context, value, extra_options)`` as an attn1 patch of ``model`` (a clone) unless it is there."""
    if fn not in model.model_options["transformer_options"].get("patches", {}).get("attn1_patch", []):
        model.set_model_attn1_patch(fn)


def context_dim(model: Any) -> int:
    """Width of the text embedding the UNet's cross-attention takes (SD1.x 768, SD2.x 1024, SDXL 2048)."""
    path = attention_blocks(model)[0].path
    return int(model.get_model_object(f"{path}.attn2.to_k").in_features)


def needs_pooled_output(model: Any) -> bool:
    """SDXL-style models also need the conditioning's pooled text embedding."""
    return getattr(model.model, "adm_channels", 0) > 0


# ---------------------------------------------------------------------------------------------- training
def training_sigmas(model: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """σ of integer training timesteps t ∈ [0, num_timesteps) (DDPM's uniform t; Tune-A-Video's draw)."""
    return model.get_model_object("model_sampling").sigma(timesteps.float())


def noise_scaling(model: Any, sigma: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """x_σ of the model-space latent ``x0`` (x0 + σ·noise for EPS and V-prediction models)."""
    return model.get_model_object("model_sampling").noise_scaling(sigma.reshape(1).to(x0), noise, x0, False)


def num_timesteps(model: Any) -> int:
    return int(model.get_model_object("model_sampling").sigmas.shape[0])


def train_on_clip(model: Any, conditioning: list, samples: torch.Tensor,
                  loop: Callable[[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.Tensor], None]) -> None:
    """Run ``loop(denoise, x0)`` inside comfy's sampling stack, the way core's TrainSampler runs its loop
    (comfy_extras/nodes_train.py): the model is loaded, conds are encoded for the clip, every patch and wrapper
    on ``model`` is active. ``x0`` is the clip in model space (F, C, h, w); ``denoise(x, σ)`` is D(x; σ) with
    guidance 1 and the conditioning, one σ for all frames. Gradients flow; the base weights get none."""
    import comfy.sample
    import comfy.samplers
    from comfy_extras.nodes_train import process_cond_list

    class ClipSampler(comfy.samplers.Sampler):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            model_wrap.conds = process_cond_list(model_wrap.conds)          # clones: no inference tensors
            x0 = latent_image.detach().clone()

            def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                return model_wrap(x, sigma.reshape(1).to(x).expand(x.shape[0]), **extra_args)

            loop(denoise, x0)
            return torch.zeros_like(latent_image)

    base = model.model
    frozen = [p for p in base.parameters() if p.requires_grad]
    with torch.inference_mode(False), torch.enable_grad():
        m = model.clone()
        _copy_inference_weights(m)
        for p in frozen:
            p.requires_grad_(False)
        try:
            sigmas = torch.tensor([1.0, 0.0])                                 # unused by ClipSampler
            comfy.sample.sample_custom(m, torch.zeros_like(samples), 1.0, ClipSampler(), sigmas, conditioning,
                                       conditioning, samples.clone(), disable_pbar=True)
        finally:
            for p in frozen:
                with torch.inference_mode(p.is_inference()):     # loaded by a node: only settable in there
                    p.requires_grad_(True)


def _copy_inference_weights(model: Any) -> None:
    """Weights loaded while ComfyUI ran a node (inference mode) cannot be saved for backward: give each such
    weight an identity weight wrapper, so comfy's cast makes a normal copy per call (as core's training does by
    wrapping every weight with an adapter)."""
    for name, module in model.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        for attr in ("weight", "bias"):
            param = getattr(module, attr, None)
            key = f"{name}.{attr}"
            if param is not None and param.is_inference() and key not in model.weight_wrapper_patches:
                model.add_weight_wrapper(key, _same)


def _same(weight: torch.Tensor) -> torch.Tensor:
    return weight


def add_trainable_weight_diff(model: Any, key: str, diff: torch.nn.Parameter) -> None:
    """``W + diff`` on ``model`` (a clone) with ``diff`` trainable: core's weight-wrapper mechanism (as its
    TrainLoraNode's BiasDiff), applied when comfy casts the weight for a call."""
    from comfy_extras.nodes_train import BiasDiff
    model.add_weight_wrapper(key, BiasDiff(diff))


@contextlib.contextmanager
def gradient_checkpointing(model: Any, enabled: bool = True) -> Iterator[None]:
    """Checkpoint the UNet's top-level layers (ResBlocks, SpatialTransformers, ...: the modules core's training
    picks, ``find_all_highest_child_module_with_forward``) while the block is active; restored afterwards.

    Unlike core's ``patch``, each call keeps a copy of the ``transformer_options`` it was given: the UNet rewrites
    ``transformer_options["block"]`` as it moves on, and the recomputation during backward must see the block
    the layer ran in (block-keyed patches look their weights up by it)."""
    if not enabled:
        yield
        return
    from comfy_extras.nodes_train import find_all_highest_child_module_with_forward
    import torch.utils.checkpoint

    modules = find_all_highest_child_module_with_forward(model.get_model_object("diffusion_model"))
    originals = {}
    for module in modules:
        forward = module.forward
        originals[module] = module.__dict__.get("forward")             # an instance forward someone set, or None

        def checkpointed(*args: Any, _forward: Callable = forward, **kwargs: Any) -> Any:
            args = tuple(dict(a) if isinstance(a, dict) else a for a in args)
            kwargs = {k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
            return torch.utils.checkpoint.checkpoint(lambda *a, **k: _forward(*a, **k), *args, use_reentrant=False,
                                                     **kwargs)

        module.forward = checkpointed
    try:
        yield
    finally:
        for module, forward in originals.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 (or fp16 where bf16 is missing) autocast on an accelerator; fp32 (no autocast) on the CPU."""
    if device.type == "cpu":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float16
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------- sampling
def scheduler_names() -> list[str]:
    import comfy.samplers
    return list(comfy.samplers.SCHEDULER_NAMES)


def inversion_sigma_grid(model: Any, scheduler: str, steps: int) -> torch.Tensor:
    """The descending σ grid of exactly ``steps`` steps (ends with 0), float32 on the CPU.

    ``ddim_uniform`` is diffusers' DDIMScheduler as SD ships it (timestep_spacing "leading", steps_offset 1):
    timesteps 1 + i·⌊1000/steps⌋ for i < steps. Core's ddim_uniform walks the same stride to the end of the
    schedule, which adds steps when ``steps`` does not divide 1000 (6 → 7, 30 → 31, 400 → 500); the first
    ``steps`` of its timesteps are diffusers' (so for 50 steps both are the same grid). Every other scheduler
    already gives ``steps`` steps.
    """
    sigmas = sigma_grid(model, scheduler, steps)
    if scheduler == "ddim_uniform" and len(sigmas) - 1 > steps:
        sigmas = torch.cat([sigmas[:-1][-steps:], sigmas[-1:]])       # the lowest ``steps`` timesteps, then 0
    return sigmas


def sigma_grid(model: Any, scheduler: str, steps: int) -> torch.Tensor:
    """The descending σ grid a core sampler would use (ends with 0), float32 on the CPU."""
    import comfy.samplers
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    return sigmas.float().cpu()


def sigma_min(model: Any) -> float:
    return float(model.get_model_object("model_sampling").sigma_min)


@dataclass(frozen=True)
class Sampling:
    """What a model's sampling does to a latent: prediction type and σ range, read from the *patched*
    ``model_sampling`` (a ModelSamplingDiscrete node or a LoRA loader may have replaced the checkpoint's)."""
    prediction: str                  # e.g. "EPS", "V_PREDICTION", "X0", "LCM"
    sigma_min: float
    sigma_max: float

    def __str__(self) -> str:
        return f"{self.prediction} σ {self.sigma_min:.4g}–{self.sigma_max:.4g}"

    def matches(self, other: "Sampling", rtol: float = 1e-3) -> bool:
        return (self.prediction == other.prediction
                and abs(self.sigma_min - other.sigma_min) <= rtol * other.sigma_min
                and abs(self.sigma_max - other.sigma_max) <= rtol * other.sigma_max)


def effective_sampling(model: Any) -> Sampling:
    """The ``Sampling`` of ``model`` (a ModelPatcher) as its sampler will run it: the prediction type is the most
    derived class of the patched model_sampling that defines ``calculate_denoised`` (EPS, V_PREDICTION, ...)."""
    ms = model.get_model_object("model_sampling")
    prediction = next((c.__name__ for c in type(ms).__mro__ if "calculate_denoised" in vars(c)), "unknown")
    return Sampling(prediction=prediction, sigma_min=float(ms.sigma_min), sigma_max=float(ms.sigma_max))


def latent_channels(model: Any) -> int:
    """Channels of the latents ``model`` samples (4 for SD1.x/SD2.x/SDXL, 16 for SD3/Flux)."""
    return int(model.model.latent_format.latent_channels)
def subdivided_grid(model: Any, sigmas: torch.Tensor, parts: int) -> torch.Tensor:
    """The descending grid ``sigmas`` (ends with 0) with each step between two nonzero σ split into ``parts``
    steps evenly spaced in the model's timestep (for ``ddim_uniform`` with n steps, the grid of n·parts steps:
    diffusers' finer DDIM timesteps); the last step, to σ = 0, stays one step. float32 on the CPU."""
    sampling = model.get_model_object("model_sampling")
    out = [sigmas[:1].float()]
    for hi, lo in zip(sigmas[:-1].float(), sigmas[1:].float()):
        if lo > 0 and parts > 1:
            t_hi, t_lo = (sampling.timestep(s.reshape(1)).float() for s in (hi, lo))
            t = t_hi + (t_lo - t_hi) * torch.arange(1, parts + 1, dtype=torch.float32) / parts
            inner = sampling.sigma(t).float().cpu()
            inner[-1] = lo
            out.append(inner)
        else:
            out.append(lo.reshape(1))
    return torch.cat(out)


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
    """The last layer of the residual branch (``out_layers``: norm, SiLU, dropout, conv2) of an output block's
    ResBlock: its output is the feature PnP and TokenFlow inject (after conv2, before the skip connection is
    added). The last layer, not ``out_layers`` itself: with scale-shift norm the ResBlock calls its parts."""
    block = model.get_model_object("diffusion_model").output_blocks[output_block]
    resblocks = [layer for layer in block if isinstance(layer, openaimodel.ResBlock)]
    if not resblocks:
        raise ValueError(f"model: output block {output_block} has no ResBlock")
    return resblocks[0].out_layers[-1]


@contextlib.contextmanager
def resblock_output_hooks(model: Any, hooks: Mapping[int, Callable[[torch.Tensor], torch.Tensor | None]]
                          ) -> Iterator[None]:
    """While the context is open, ``hooks[i](h)`` sees (and may replace) the residual-branch output ``h`` of
    output block ``i``'s ResBlock (``resblock_branch``); nothing stays on the shared UNet afterwards."""
    handles = [resblock_branch(model, i).register_forward_hook(lambda module, inputs, out, fn=fn: fn(out))
               for i, fn in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------- the TVE state
def get_attachment(model: Any, key: str = WRAPPER_KEY) -> Any:
    return model.get_attachment(key)


def set_attachment(model: Any, obj: Any, key: str = WRAPPER_KEY) -> None:
    """Attach ``obj`` to the clone ``model``; clones made later share it (it must be immutable)."""
    model.set_attachments(key, obj)


def set_wrapper(model: Any, wrapper_type: str, fn: Callable) -> None:
    """Make ``fn`` the one TVE wrapper of ``wrapper_type`` on the clone ``model`` (an earlier one is removed)."""
    model.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    model.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, fn)


def set_inpaint_latent(model: Any, fn: Callable[..., torch.Tensor]) -> None:
    """Make ``fn(sigma=, noise=, latent_image=, x=)`` what a masked sampling run of ``model`` puts outside the
    mask at each step (core's KSamplerX0Inpaint asks the BaseModel's ``scale_latent_inpaint``; an object patch)."""
    model.add_object_patch("scale_latent_inpaint", fn)


def prepare_mask(noise_mask: torch.Tensor, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """A LATENT's ``noise_mask`` resized to ``shape`` (F, C, h, w) as core samplers resize it."""
    import comfy.sampler_helpers
    return comfy.sampler_helpers.prepare_mask(noise_mask, tuple(shape), device)
def multigpu_clones(model: Any) -> list:
    """The per-device clones core's MultiGPU CFG Split (``MultiGPU_WorkUnits``, 0.33+) added to ``model`` (its
    additional models under the key ``multigpu``): core then spreads a step's conds over them in threads."""
    return list(model.get_additional_models_with_key("multigpu"))


def sampling_model(outer_sample_executor: Any) -> Any:
    """The ModelPatcher an OUTER_SAMPLE wrapper's executor samples with (its guider's model)."""
    return outer_sample_executor.class_obj.model_patcher


# ---------------------------------------------------------------------------------------------- conds of some frames
def cond_for_frames(cond: dict, local: torch.Tensor, frames: int, frame_ids: Sequence[int], video_frames: int,
                    cache: dict | None = None) -> dict:
    """One cond dict of a call over ``frames`` frames, restricted to the call's frames ``local`` (indices into the
    call) whose global ids are ``frame_ids``: per-frame model conds (batch == frames) follow the frames, and every
    ControlNet / T2I-Adapter of its control chain gets the hint images of those global frames."""
    sliced = dict(cond)
    model_conds = {}
    for name, value in cond.get("model_conds", {}).items():
        tensor = getattr(value, "cond", None)
        if isinstance(tensor, torch.Tensor) and tensor.ndim > 0 and tensor.shape[0] == frames > 1:
            value = value._copy_with(tensor[local.to(tensor.device)])
        model_conds[name] = value
    sliced["model_conds"] = model_conds
    if cond.get("control") is not None:
        sliced["control"] = control_for_frames(cond["control"], frame_ids, video_frames, cache)
    return sliced


_CONTROL_RUN_STATE = ("timestep_range", "model_sampling_current", "control_model", "control_model_wrapped")


def control_for_frames(control: Any, frame_ids: Sequence[int], video_frames: int, cache: dict | None = None) -> Any:
    """A copy of the control chain (ControlNet, T2I-Adapter, ControlLoRA, stacked through ``previous_controlnet``)
    whose per-frame hints are those of the global frames ``frame_ids``; a single hint image is shared by all frames
    and stays as it is. Core broadcasts a hint batch by truncating it to the call's first frames, which is right
    only for a call over frames 0..n-1. Copies are cached in ``cache`` by (control, frames): their upscaled hints
    and adapter features are computed once per run."""
    key = (id(control), tuple(frame_ids))
    if cache is not None and key in cache:
        return cache[key]
    c = control.copy()
    for name in _CONTROL_RUN_STATE:                 # set by pre_run on the original, which the copy skips
        if getattr(c, name, None) is None and getattr(control, name, None) is not None:
            setattr(c, name, getattr(control, name))
    hint = control.cond_hint_original
    if hint is not None and hint.shape[0] > 1:
        check_control_hints(control, video_frames)
        c.cond_hint_original = hint[list(frame_ids)]
    c.extra_concat_orig = [t[list(frame_ids)] if t.shape[0] == video_frames > 1 else t
                           for t in control.extra_concat_orig]
    if control.previous_controlnet is not None:
        c.set_previous_controlnet(control_for_frames(control.previous_controlnet, frame_ids, video_frames, cache))
    if cache is not None:
        cache[key] = c
    return c


def check_control_hints(control: Any, video_frames: int) -> None:
    """Every control of a chain has one hint image per video frame, or one for all of them."""
    while control is not None:
        hint = control.cond_hint_original
        if hint is not None and hint.shape[0] not in (1, video_frames):
            raise ValueError(f"control: a ControlNet / T2I-Adapter has {hint.shape[0]} hint images but the video has "
                             f"{video_frames} frames; give it one image per frame (or a single image)")
        control = control.previous_controlnet
