"""The one adapter between TVE and ComfyUI: everything host-specific that the nodes need.

Nothing else in the pack imports comfy internals (the node classes import only ComfyUI's public node API). The engine
and the nodes use only what this file exposes, one named function per internal, each pinned by a real-host test on
every tested release (``tests/test_host.py`` and the tests of the code that calls it); the test suite's stand-in
host mirrors this surface.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
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
RUN_KEY = "text_video_edit_run"      # transformer_options entry: the sampling call's state (run.SamplingRun)
APPLY_MODEL = comfy.patcher_extension.WrappersMP.APPLY_MODEL
OUTER_SAMPLE = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
CALC_COND_BATCH = comfy.patcher_extension.WrappersMP.CALC_COND_BATCH
DIFFUSION_MODEL = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL   # around each UNet call (probes, audits)


# ---------------------------------------------------------------------------------------------- model files
def default_model_folder(folder: str) -> str:
    """``models/<folder>`` of this ComfyUI (the first path a model folder TVE registers lists)."""
    return os.path.join(folder_paths.models_dir, folder)


def register_optical_flow_folder() -> None:
    """Add ``models/optical_flow``, keeping paths the artist set in extra_model_paths.yaml (read earlier)."""
    default = default_model_folder(OPTICAL_FLOW_FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.get(OPTICAL_FLOW_FOLDER, ([], None))
    folder_paths.folder_names_and_paths[OPTICAL_FLOW_FOLDER] = (
        [default] + [p for p in paths if p != default], set(folder_paths.supported_pt_extensions))


def register_adapter_folder() -> None:
    """Add ``models/tve_adapters`` (temporal adapters, .safetensors), keeping paths from extra_model_paths.yaml."""
    default = default_model_folder(ADAPTER_FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.get(ADAPTER_FOLDER, ([], None))
    folder_paths.folder_names_and_paths[ADAPTER_FOLDER] = ([default] + [p for p in paths if p != default],
                                                           {".safetensors"})


def adapter_files() -> list[str]:
    return folder_paths.get_filename_list(ADAPTER_FOLDER)


def adapter_folders() -> list[str]:
    return folder_paths.get_folder_paths(ADAPTER_FOLDER)


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


_FOLDER_EXTENSIONS = {ADAPTER_FOLDER: {".safetensors"}}        # other folders: every checkpoint extension


@contextlib.contextmanager
def model_folder_at(folder: str, path: str) -> Iterator[None]:
    """While open, the model folder ``folder`` (e.g. ``OPTICAL_FLOW_FOLDER``) is ``path`` alone, as an
    extra_model_paths.yaml entry read before TVE registered it would make it (tests and scripts bringing their own
    files); afterwards it is as it was, and file lists are read afresh."""
    saved = folder_paths.folder_names_and_paths.get(folder)
    cache = getattr(folder_paths, "filename_list_cache", {})          # the real host caches file lists
    cache.pop(folder, None)
    folder_paths.folder_names_and_paths[folder] = (
        [path], set(_FOLDER_EXTENSIONS.get(folder, folder_paths.supported_pt_extensions)))
    try:
        yield
    finally:
        if saved is None:
            folder_paths.folder_names_and_paths.pop(folder, None)
        else:
            folder_paths.folder_names_and_paths[folder] = saved
        cache.pop(folder, None)


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


Interrupted = comfy.model_management.InterruptProcessingException     # what a cancelled node raises


def interrupt(requested: bool = True) -> None:
    """What the cancel button does (``requested``) or the executor after a cancelled prompt (not): while requested,
    the next progress update of a node (``progress``, core samplers) raises ``Interrupted`` and clears it."""
    comfy.model_management.interrupt_current_processing(requested)


def interrupt_requested() -> bool:
    return comfy.model_management.processing_interrupted()


def preview_images(images: torch.Tensor, prefix: str) -> list[dict]:
    """Save ``images`` (N, H, W, 3) as the temporary PNGs core PreviewImage shows on a node; its ``ui.images``
    entries (filename, subfolder, type) for a node's ``{"ui": {"images": ...}}``."""
    import nodes
    return nodes.PreviewImage().save_images(images, filename_prefix=prefix)["ui"]["images"]


def preview_path(entry: Mapping[str, str]) -> str:
    """The file a ``preview_images`` entry names (in ComfyUI's temp folder)."""
    return os.path.join(folder_paths.get_temp_directory(), entry["subfolder"], entry["filename"])


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


def node_ids() -> set[str]:
    """Ids of every node class ComfyUI has registered (``NODE_CLASS_MAPPINGS``)."""
    import nodes
    return set(nodes.NODE_CLASS_MAPPINGS)


def load_custom_nodes(folder: str) -> bool:
    """Load the custom node pack in ``folder`` as ComfyUI's startup loads ``custom_nodes/*`` (its nodes join the
    registry); whether it loaded."""
    import asyncio
    import inspect
    import nodes
    loading = nodes.load_custom_node(folder, module_parent="custom_nodes")
    return bool(asyncio.run(loading) if inspect.iscoroutine(loading) else loading)


def comfyui_version() -> str:
    import comfyui_version as version
    return version.__version__


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


def attention_backend(name: str) -> Callable[..., torch.Tensor]:
    """One of the host's attention functions by name, ``fn(q, k, v, heads)`` on (B, L, heads·d) tensors:
    ``"basic"`` (plain softmax attention) or a registered backend (``"pytorch"``, ``"sub_quad"``, ``"split"``, and
    ``"xformers"``/``"sage"``/``"flash"`` where installed)."""
    if name == "basic":
        return comfy_attention.attention_basic
    return comfy_attention.get_attention_function(name)


def optimized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                        extra_options: Mapping[str, Any]) -> torch.Tensor:
    """The host's attention backend (SDPA / xformers / sage / sub-quadratic), looked up at call time."""
    return comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"),
                                               transformer_options=extra_options)


# ---------------------------------------------------------------------------------------------- calls and steps
def context_window(transformer_options: Mapping[str, Any]) -> Any:
    """The core context window a UNet call runs in (Context Windows nodes), or None."""
    return transformer_options.get("context_window")


def context_window_frame_ids(window: Any) -> tuple[int, ...]:
    """Global frame ids of the frames a core context window's call holds, in call order: its ``index_list``,
    preceded by the causal frame core 0.33+ prepends (``causal_window_fix``, on by default: the frame before the
    window, whose output core drops after the call)."""
    ids = tuple(int(i) for i in window.index_list)
    anchor = getattr(window, "causal_anchor_index", None)
    if anchor is not None and anchor >= 0:
        ids = (int(anchor),) + ids
    return ids


def current_step(timestep: torch.Tensor, transformer_options: Mapping[str, Any]) -> int:
    """Index of the σ being evaluated (``timestep``, one σ per frame) in the sampler's schedule (nearest match), or
    -1 outside a sampling run. Reads a device value: call it once per step, not per block."""
    schedule = transformer_options.get("sample_sigmas")
    if schedule is None:
        return -1
    sigma = timestep.reshape(-1)[0].float().cpu()
    return int(torch.argmin((schedule.float().cpu() - sigma).abs()))


def schedule_length(transformer_options: Mapping[str, Any]) -> int:
    """Steps of the sampler's schedule (its σ count minus one), or 0 outside a sampling run."""
    schedule = transformer_options.get("sample_sigmas")
    return 0 if schedule is None else max(1, len(schedule) - 1)


def cond_chunks(extra_options: Mapping[str, Any]) -> int:
    """How many cond chunks (uncond, cond, ...) an attention call's batch holds."""
    return len(extra_options["cond_or_uncond"])


def token_grid(extra_options: Mapping[str, Any]) -> tuple[int, int]:
    """The (h, w) token grid of the block an attention patch is called from."""
    h, w = (int(s) for s in extra_options["activations_shape"][-2:])
    return h, w


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


def input_scale(model: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """σ -> c_in(σ), the factor ``model``'s sampling multiplies a model-space latent at σ by before its diffusion
    model sees it: 1/√(σ² + σ_data²) for EPS and V-prediction (so the UNet sees DDPM's √ᾱ·x), 1 for flow models.
    Takes σ of any shape, returns the same shape."""
    sampling = model.get_model_object("model_sampling")

    def scale(sigma: torch.Tensor) -> torch.Tensor:
        flat = sigma.reshape(-1)
        return sampling.calculate_input(flat, torch.ones_like(flat)).reshape(sigma.shape)

    return scale


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


def sampler_names() -> list[str]:
    """Every core sampler's name (what KSampler's sampler_name offers)."""
    import comfy.samplers
    return list(comfy.samplers.SAMPLER_NAMES)


def sample(model: Any, noise: torch.Tensor, cfg: float, sampler_name: str, sigmas: torch.Tensor, positive: list,
           negative: list, latent: torch.Tensor, seed: int | None = None, noise_mask: torch.Tensor | None = None,
           callback: Callable[[int, Any, torch.Tensor, int], None] | None = None) -> torch.Tensor:
    """Core sampler ``sampler_name`` with CFG ``cfg`` over ``sigmas`` (descending, ends with 0), as core's
    SamplerCustom runs it: unit ``noise`` (zeros: none) scaled to ``sigmas[0]`` is added to the raw ``latent``,
    every patch and wrapper on ``model`` is active, a LATENT's ``noise_mask`` keeps what is outside it; ``seed``
    feeds the sampler's own noise (ancestral and SDE samplers); ``callback(step, x0, x, total)`` after each step.
    Raw latent out."""
    import comfy.sample
    import comfy.samplers
    return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object(sampler_name), sigmas,
                                      positive, negative, latent, noise_mask=noise_mask, callback=callback,
                                      disable_pbar=True, seed=seed)


def sample_euler_guided(model: Any, noise: torch.Tensor, latent: torch.Tensor, sigmas: torch.Tensor, positive: list,
                        negative: list, cfg: float, seed: int, callback: Callable | None = None) -> torch.Tensor:
    """Core Euler (DDIM, η = 0) with CFG over ``sigmas``: raw latent in, raw latent out, through comfy's whole
    sampling stack (the sampler a core KSampler runs)."""
    return sample(model, noise, cfg, "euler", sigmas, positive, negative, latent, seed=seed, callback=callback)


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
def forward_hooks(hooks: Mapping[torch.nn.Module, Callable[[torch.Tensor], torch.Tensor | None]]) -> Iterator[None]:
    """While the context is open, ``hooks[module](out)`` sees (and may replace) each module's output; nothing stays
    on the shared UNet afterwards (hooks for one sampling run)."""
    handles = [module.register_forward_hook(lambda m, inputs, out, fn=fn: fn(out)) for module, fn in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------- the TVE method stack
def get_attachment(model: Any, key: str = WRAPPER_KEY) -> Any:
    return model.get_attachment(key)


def set_attachment(model: Any, obj: Any, key: str = WRAPPER_KEY) -> None:
    """Attach ``obj`` to the clone ``model``; clones made later share it (it must be immutable)."""
    model.set_attachments(key, obj)


def set_wrapper(model: Any, wrapper_type: str, fn: Callable) -> None:
    """Make ``fn`` the one TVE wrapper of ``wrapper_type`` on the clone ``model`` (an earlier one is removed)."""
    model.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    model.add_wrapper_with_key(wrapper_type, WRAPPER_KEY, fn)


def add_wrapper(model: Any, wrapper_type: str, key: str, fn: Callable) -> None:
    """Add ``fn`` as a wrapper of ``wrapper_type`` (e.g. ``DIFFUSION_MODEL``: ``fn(executor, x, timesteps, context,
    y, control, transformer_options, **kwargs)``, which must call ``executor`` with them) under ``key`` on the
    clone ``model``, after those already there."""
    model.add_wrapper_with_key(wrapper_type, key, fn)


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


def set_sampling_run(outer_sample_executor: Any, run: Any) -> None:
    """Make ``run`` this sampling call's state: its ``transformer_options`` (the guider's own copy for this call,
    ``create_model_options_clone``) carry it under ``RUN_KEY`` to every UNet call, patch and wrapper of the call."""
    outer_sample_executor.class_obj.model_options["transformer_options"][RUN_KEY] = run


# ---------------------------------------------------------------------------------------------- conds of some frames
def cond_for_frames(cond: dict, positions: torch.Tensor, frames: int, frame_ids: Sequence[int], video_frames: int,
                    cache: dict | None = None) -> dict:
    """One cond dict of a call over ``frames`` frames, restricted to the call ``positions`` whose frame ids are
    ``frame_ids``: per-frame model conds (batch == frames) follow the frames, and every ControlNet / T2I-Adapter
    of its control chain gets the hint images of those frames (checked by ``validation.control_hints``)."""
    sliced = dict(cond)
    model_conds = {}
    for name, value in cond.get("model_conds", {}).items():
        tensor = getattr(value, "cond", None)
        if isinstance(tensor, torch.Tensor) and tensor.ndim > 0 and tensor.shape[0] == frames > 1:
            value = value._copy_with(tensor[positions.to(tensor.device)])
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
        c.cond_hint_original = hint[list(frame_ids)]
    c.extra_concat_orig = [t[list(frame_ids)] if t.shape[0] == video_frames > 1 else t
                           for t in control.extra_concat_orig]
    if control.previous_controlnet is not None:
        c.set_previous_controlnet(control_for_frames(control.previous_controlnet, frame_ids, video_frames, cache))
    if cache is not None:
        cache[key] = c
    return c


def control_hint_counts(control: Any) -> list[int]:
    """Hint images of every control of a chain (ControlNet, T2I-Adapter, ... through ``previous_controlnet``)."""
    counts = []
    while control is not None:
        hint = control.cond_hint_original
        if hint is not None:
            counts.append(int(hint.shape[0]))
        control = control.previous_controlnet
    return counts


# ==============================================================================================================
# Model identity (issue 24): what identifies the weights a sampler runs, for checks that a MODEL is the one an
# inversion or a temporal adapter was made with. New functions only; the nodes compare fingerprints through
# ``validation.weights_difference``.
# ==============================================================================================================
FINGERPRINT_PER_TENSOR = 8           # strided samples of every weight and of every patch tensor


@dataclass(frozen=True, eq=False)
class WeightsFingerprint:
    """The UNet's weights as the sampler will run them, cheaply: the base weights and everything that patches them
    (LoRA and other ``add_patches`` patches with their strengths, hook patches, weight wrappers). Device- and
    dtype-agnostic: the samples are float32 on the CPU, so a clone on another device or the same checkpoint cast to
    fp16/bf16 compares equal within ``validation.WEIGHTS_RTOL``. Attention patches, wrappers, attachments and
    object patches (what TVE adds) are not weights and are not part of it."""
    layout: str                  # sha256 of every UNet weight's name and shape: the architecture
    base: torch.Tensor           # (n,) float32 CPU: FINGERPRINT_PER_TENSOR strided values of every base weight
    patches: str                 # sha256 of what patches the weights: keys, kinds, strengths, offsets, functions
    patch_values: torch.Tensor   # (m,) float32 CPU: strided values of every tensor those patches hold
    summary: str                 # e.g. "686 UNet weights, weight patches on 64" (for messages)


def weights_fingerprint(model: Any) -> WeightsFingerprint:
    """The ``WeightsFingerprint`` of ``model`` (a ModelPatcher).

    Base weights are read where comfy keeps the unpatched ones: a key whose patched copy is loaded in the UNet has
    its original in ``backup`` (or ``hook_backup`` while hook patches are applied); clones share the UNet and these
    backups, so every clone reads the same base. Per device one concatenation and one transfer to the host."""
    unet = model.model.diffusion_model
    backup, hook_backup = getattr(model, "backup", {}), getattr(model, "hook_backup", {})
    names, shapes, samples = [], [], []
    for name, tensor in unet.state_dict(keep_vars=True).items():
        key = f"diffusion_model.{name}"
        if key in backup:
            tensor = backup[key].weight
        elif key in hook_backup:
            tensor = hook_backup[key][0]
        names.append(key)
        shapes.append(tuple(tensor.shape))
        samples.append(_strided(tensor))
    layout = hashlib.sha256(";".join(f"{n}:{s}" for n, s in zip(names, shapes)).encode()).hexdigest()

    text: list[str] = []
    tensors: list[torch.Tensor] = []
    patches = getattr(model, "patches", {})
    for key in sorted(patches):
        text.append(f"patch {key}")
        _describe(patches[key], text, tensors)
    hooks = []
    for hook_patches in getattr(model, "hook_patches", {}).values():        # keyed by hook objects: sort by content
        hook_text, hook_tensors = [], []
        for key in sorted(hook_patches):
            hook_text.append(f"hook patch {key}")
            _describe(hook_patches[key], hook_text, hook_tensors)
        hooks.append(("\n".join(hook_text), hook_tensors))
    for hook_text, hook_tensors in sorted(hooks, key=lambda h: h[0]):
        text.append(hook_text)
        tensors.extend(hook_tensors)
    wrappers = getattr(model, "weight_wrapper_patches", {})
    for key in sorted(wrappers):
        text.append(f"wrapper {key}")
        _describe(wrappers[key], text, tensors)

    parts = [f"{len(names)} UNet weights"]
    if patches:
        parts.append(f"weight patches (LoRA, tuning, merges) on {len(patches)}")
    if hooks:
        parts.append(f"{len(hooks)} hook patch group(s)")
    if wrappers:
        parts.append(f"weight wrappers on {len(wrappers)}")
    return WeightsFingerprint(layout=layout, base=_to_host(samples),
                              patches=hashlib.sha256("\n".join(text).encode()).hexdigest(),
                              patch_values=_to_host([_strided(t) for t in tensors]), summary=", ".join(parts))


def _strided(tensor: torch.Tensor) -> torch.Tensor:
    """FINGERPRINT_PER_TENSOR evenly strided values of ``tensor`` (a view where it is contiguous: no copy)."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // FINGERPRINT_PER_TENSOR)
    return flat[::step][:FINGERPRINT_PER_TENSOR]


def _to_host(samples: Sequence[torch.Tensor]) -> torch.Tensor:
    """``samples`` concatenated in order as float32 on the CPU: per device one ``cat`` and one transfer."""
    if not samples:
        return torch.zeros(0)
    by_device: dict[torch.device, list[int]] = {}
    for i, s in enumerate(samples):
        by_device.setdefault(s.device, []).append(i)
    pieces: dict[int, torch.Tensor] = {}
    for device, index in by_device.items():
        values = torch.cat([samples[i] if samples[i].is_floating_point() and samples[i].element_size() >= 2
                            else samples[i].float() for i in index])            # fp16/bf16/fp32 promote
        for i, piece in zip(index, values.float().cpu().split([samples[i].numel() for i in index])):
            pieces[i] = piece
    return torch.cat([pieces[i] for i in range(len(samples))])


_SCALARS = (bool, int, float, str, bytes, type(None))


def _describe(value: Any, text: list[str], tensors: list[torch.Tensor], depth: int = 0) -> None:
    """Append a deterministic description of a patch value to ``text`` and its tensors to ``tensors``: containers
    item by item, tensors by shape (their values are sampled), functions by qualified name, adapter objects (comfy's
    LoRAAdapter, ...) by type and attributes, modules (weight wrappers) by type and state."""
    if isinstance(value, torch.Tensor):
        text.append(f"tensor{tuple(value.shape)}")
        tensors.append(value)
    elif isinstance(value, _SCALARS):
        text.append(repr(value))
    elif isinstance(value, (list, tuple)):
        text.append(f"{type(value).__name__}[")
        for item in value:
            _describe(item, text, tensors, depth + 1)
        text.append("]")
    elif isinstance(value, (set, frozenset)):        # names (LoRAAdapter.loaded_keys: every key of its file, shared)
        text.append(f"set({len(value)})")
    elif isinstance(value, dict):
        text.append("{")
        for k in sorted(value, key=repr):
            text.append(repr(k))
            _describe(value[k], text, tensors, depth + 1)
        text.append("}")
    elif isinstance(value, torch.nn.Module):
        text.append(_qualified(type(value)))
        _describe(dict(value.state_dict(keep_vars=True)), text, tensors, depth + 1)
    elif isinstance(value, functools.partial):
        text.append("partial")
        _describe((value.func, value.args, value.keywords), text, tensors, depth + 1)
    elif hasattr(value, "__func__") and hasattr(value, "__self__"):             # a bound method: its object counts
        text.append(_qualified(value.__func__))
        _describe(value.__self__, text, tensors, depth + 1)
    elif callable(value) and hasattr(value, "__qualname__"):                      # a function or a class
        text.append(_qualified(value))
    else:
        text.append(_qualified(type(value)))
        if depth < 4:
            _describe({k: v for k, v in vars(value).items() if not k.startswith("_")} if hasattr(value, "__dict__")
                      else {}, text, tensors, depth + 1)


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def weight_shapes(model: Any, keys: Iterable[str]) -> dict[str, tuple[int, ...] | None]:
    """The shape of each weight ``key`` of ``model``'s BaseModel (e.g. 'diffusion_model.….to_q.weight'), None for a
    key the model does not have."""
    state = model.model_state_dict()
    return {key: tuple(state[key].shape) if key in state else None for key in keys}


# ==============================================================================================================
# Models, controls and VAEs for scripts, tools and tests (issue 21): what core's loaders make from a file, made from
# a layout or a state dict in memory, so that nothing outside this file builds comfy's classes itself.
# ==============================================================================================================
MODEL_CONFIGS = ("SD15", "SD20", "SDXL")         # comfy's model configs (supported_models) TVE edits with


def build_model(config: str, unet_config: Mapping[str, Any], prediction: str = "EPS") -> Any:
    """A MODEL (ModelPatcher) whose BaseModel comfy builds from its model config ``config`` (one of
    ``MODEL_CONFIGS``: latent format, sampling schedule, conds) with the UNet layout ``unet_config`` (UNetModel
    arguments; they override the config's own, e.g. a shrunk SD1.5 with ``num_head_channels``) and ``prediction``
    ("EPS" or "V_PREDICTION"); fp32 on the CPU, weights uninitialised (comfy's layers skip init: set them).
    What a checkpoint loader does once it has detected the config, for layouts too small to be detected."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    if config not in MODEL_CONFIGS:
        raise ValueError(f"config: expected one of {MODEL_CONFIGS}, got '{config}'")
    model_config = getattr(comfy.supported_models, config)(dict(unet_config))
    model_config.unet_config.update(unet_config)         # the layout given wins over the config's extra settings
    model_config.set_inference_dtype(torch.float32, None)
    model_class = comfy.model_base.SDXL if config == "SDXL" else comfy.model_base.BaseModel
    base = model_class(model_config, model_type=comfy.model_base.ModelType[prediction], device=torch.device("cpu"))
    return comfy.model_patcher.ModelPatcher(base, load_device=torch_device(), offload_device=offload_device())


def checkpoint_model(path: str) -> Any:
    """The MODEL of the checkpoint file ``path`` as core's CheckpointLoaderSimple loads it (config detected from
    the weights), without its CLIP and VAE."""
    import comfy.sd
    return comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]


def add_lora(model: Any, lora: Mapping[str, torch.Tensor], strength: float) -> Any:
    """A clone of ``model`` with the LoRA state dict ``lora`` (kohya ``lora_unet_*`` keys, ...) at ``strength``:
    what core's LoraLoaderModelOnly does with a LoRA file once it has read it."""
    import comfy.sd
    return comfy.sd.load_lora_for_models(model, None, dict(lora), strength, 0.0)[0]


def new_weight_hook() -> Any:
    """A fresh weight hook (core's Create Hook nodes make one per LoRA or model they hook): the key under which
    ``model.add_hook_patches(hook, patches, strength)`` groups weight patches applied only while the hook is on."""
    import comfy.hooks
    return comfy.hooks.WeightHook()


def load_model(model: Any) -> None:
    """Load ``model`` for sampling as a sampler does (its weights patched in, on its load device)."""
    comfy.model_management.load_models_gpu([model], force_full_load=True)


def unload_models() -> None:
    """Unload every loaded model (weights unpatched, back on their offload device)."""
    comfy.model_management.unload_all_models()


_CONTROLNET_SKIPS = ("out_channels", "transformer_depth_output", "use_temporal_resblock", "use_temporal_attention")


def build_controlnet(unet_config: Mapping[str, Any], weights: Callable[[torch.nn.Module], None],
                     hint_channels: int = 3) -> Any:
    """A CONTROL_NET socket value (core's ControlNet) around comfy's ControlNet model (cldm) for a UNet of
    ``unet_config`` (as ``build_model`` takes it), hints of ``hint_channels`` channels, fp32 on the CPU;
    ``weights(module)`` sets the new module's weights (comfy's layers skip init). What core's ControlNet loader
    makes of a ControlNet file for such a UNet."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops
    config = {k: v for k, v in unet_config.items() if k not in _CONTROLNET_SKIPS}
    module = comfy.cldm.cldm.ControlNet(hint_channels=hint_channels, dtype=torch.float32, device=torch.device("cpu"),
                                        operations=comfy.ops.disable_weight_init, **config)
    weights(module)
    module.eval()
    return comfy.controlnet.ControlNet(module, load_device=torch_device())


def build_t2i_adapter(channels: Sequence[int], weights: Callable[[torch.nn.Module], None]) -> Any:
    """A CONTROL_NET socket value (core's T2IAdapter) around comfy's full T2I-Adapter with one residual block per
    level and ``channels`` per level (a feature for every third UNet input block, as SD1.5's), RGB hints, fp32 on
    the CPU; ``weights(module)`` sets the new module's weights."""
    import comfy.controlnet
    from comfy.t2i_adapter.adapter import Adapter
    module = Adapter(channels=list(channels), nums_rb=1, cin=3 * 64, ksize=1, sk=True, use_conv=False, xl=False)
    weights(module)
    module.eval()
    return comfy.controlnet.T2IAdapter(module, 3, 8, "nearest-exact", device=torch.device("cpu"))


def vae_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Any:
    """A VAE socket value that comfy builds from ``state_dict`` (the model it detects from the keys), as core's
    VAELoader does with a VAE file's weights."""
    import comfy.sd
    return comfy.sd.VAE(sd=dict(state_dict))


# ==============================================================================================================
# Window sizes (issue 24): what core's Context Windows nodes set on a MODEL.
# ==============================================================================================================
def context_window_length(model: Any) -> int | None:
    """Frames per window of the core Context Windows node on ``model`` (its handler's ``context_length``), or None
    when no such node (or a handler of another kind) is on it."""
    handler = model.model_options.get("context_handler")
    length = getattr(handler, "context_length", None)
    return int(length) if isinstance(length, int) and not isinstance(length, bool) else None


# ---------------------------------------------------------------------------------------------- frame-pooled norms
def resblock_group_norms(model: Any) -> dict[str, torch.nn.Module]:
    """The GroupNorms FLATTEN's inflated UNet runs on video tensors (Cong et al. 2024; the official code's
    ``ResnetBlock3D.norm1/norm2`` and ``conv_norm_out``), by module path under the ModelPatcher's model: both norms
    of every ResBlock (``in_layers[0]``, ``out_layers[0]``) and the output norm (``out[0]``), in module order. The
    transformers' own GroupNorm (``SpatialTransformer.norm``) stays per frame there too, so it is not listed."""
    unet = model.get_model_object("diffusion_model")
    norms: dict[str, torch.nn.Module] = {}
    for name, module in unet.named_modules():
        if isinstance(module, openaimodel.ResBlock):
            for part in ("in_layers", "out_layers"):
                norms[f"diffusion_model.{name}.{part}.0"] = getattr(module, part)[0]
    out = getattr(unet, "out", None)
    if not norms or not isinstance(out, torch.nn.Sequential) or not isinstance(out[0], torch.nn.GroupNorm):
        raise ValueError(f"model: {type(unet).__name__} has no ResBlocks with an output GroupNorm; TVE supports "
                         "SD1.x, SD2.x and SDXL models")
    norms["diffusion_model.out.0"] = out[0]
    for path, module in norms.items():
        if not isinstance(module, torch.nn.GroupNorm):
            raise ValueError(f"model: {path} is a {type(module).__name__}, not a GroupNorm")
    return norms


@contextlib.contextmanager
def calls_in_layout(modules: Iterable[torch.nn.Module], to_layout: Callable[[torch.Tensor], torch.Tensor],
                    from_layout: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While the context is open, each of ``modules`` is called on ``to_layout(x)`` instead of its input ``x`` and
    its output ``out`` is returned as ``from_layout(out)``: the module computes with its own weights, casts and
    weight patches, on another layout of the same values (a GroupNorm on the (chunks, C, F, h, w) view pools its
    statistics over the frames). Forward hooks for one sampling run: nothing stays on the shared UNet afterwards."""
    def pre(module: torch.nn.Module, args: tuple) -> tuple:
        return (to_layout(args[0]), *args[1:])

    def post(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return from_layout(out)

    handles = []
    try:
        for module in dict.fromkeys(modules):
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        yield
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------- CFG chunks alike
# transformer patches that act only after the first self-attention has read its q, k, v
_AFTER_FIRST_SELF_ATTENTION = frozenset({"attn1_output_patch", "middle_patch", "attn2_patch", "attn2_output_patch",
                                         "output_block_patch"})


def chunks_alike_before_text(x: torch.Tensor, t: torch.Tensor, c_concat: torch.Tensor | None, control: Any,
                             transformer_options: Mapping[str, Any], kwargs: Mapping[str, Any],
                             own_patches: Iterable[Callable] = ()) -> tuple[int, ...]:
    """For each CFG chunk of one UNet call (an APPLY_MODEL wrapper's arguments), the first chunk whose inputs up to
    the UNet's first cross-attention equal its own, so that the first self-attention block sees equal q, k, v in
    both: the same latents, timesteps, concat latents and per-row extra conds (``y``: SDXL's pooled text and sizes)
    chunk for chunk, no ControlNet / T2I-Adapter residuals (they are computed from the text), and no other pack's
    transformer patch before that block (``own_patches`` are the caller's, known to treat chunks alike). Everything
    else is the text context (``c_crossattn``), which enters at the first cross-attention. Reads the inputs' values
    (``torch.equal``): call it once per UNet call, outside the UNet, never per block."""
    chunks = len(transformer_options.get("cond_or_uncond", ())) or 1
    own = set(own_patches)
    rows = x.shape[0]
    distinct = tuple(range(chunks))
    if chunks == 1 or rows % chunks or control is not None:
        return distinct
    for name, fns in transformer_options.get("patches", {}).items():
        if name not in _AFTER_FIRST_SELF_ATTENTION and any(fn not in own for fn in fns):
            return distinct
    inputs = [x, t, c_concat, *kwargs.values()]
    per_row = [v.unflatten(0, (chunks, rows // chunks)) for v in inputs
               if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == rows]       # (chunks, F, ...) each
    kinds: list[int] = []
    for c in range(chunks):
        kinds.append(next((d for d in sorted(set(kinds)) if all(torch.equal(v[c], v[d]) for v in per_row)), c))
    return tuple(kinds)


# ---------------------------------------------------------------------------------------------- ending a UNet call
UNET_CALL_END_KEY = "text_video_edit_call_end"      # the DIFFUSION_MODEL wrapper that ends a UNet call early


class _UNetCallEnded(Exception):
    """Private: raised by ``end_unet_call`` inside a UNet call, caught only by ``_end_unet_call_here``."""


def set_unet_call_end(model: Any) -> None:
    """Let a patch or forward hook end a UNet call of the clone ``model`` early (``end_unet_call``): a keyed
    DIFFUSION_MODEL wrapper around ``UNetModel._forward`` (the host's own wrapper point, on both releases) that
    catches the end and returns zeros of the UNet output's shape. Installed once per clone."""
    model.remove_wrappers_with_key(DIFFUSION_MODEL, UNET_CALL_END_KEY)
    model.add_wrapper_with_key(DIFFUSION_MODEL, UNET_CALL_END_KEY, _end_unet_call_here)


def ends_unet_calls(transformer_options: Mapping[str, Any]) -> bool:
    """Whether the UNet calls made with ``transformer_options`` (a sampling call's) may be ended early: the model
    being sampled carries ``set_unet_call_end``'s wrapper."""
    return UNET_CALL_END_KEY in transformer_options.get("wrappers", {}).get(DIFFUSION_MODEL, {})


def end_unet_call() -> None:
    """End the UNet call now running (only where ``ends_unet_calls``), from an attn1 patch or a forward hook
    between two layers: no layer is mid-forward (no weight cast, offload stream or hook of the host is half done),
    the exception unwinds ``UNetModel._forward`` only, and every host frame outside the diffusion model sees the
    call return an output that nobody reads (zeros)."""
    raise _UNetCallEnded


def _end_unet_call_here(executor: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    try:
        return executor(x, *args, **kwargs)
    except _UNetCallEnded:
        unet = executor.class_obj                                           # the UNetModel the wrapper is around
        return x.new_zeros((x.shape[0], unet.out_channels, *x.shape[2:]))   # (B, C_out, h, w), never read
