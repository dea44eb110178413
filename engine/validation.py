"""What every TVE node refuses, in one place: each node checks the values on its inputs here before it patches or
computes anything, so bad input ends in one error naming the input and what was expected, never in a library
traceback or a silently wrong result.

- Numbers: NaN/Inf passes ComfyUI's min/max validation (every comparison with NaN is false), so float widgets are
  checked here; frames, latents and flow are checked for non-finite values (an fp16 VAE produces NaN on its own).
- Sizes, with the reason: frames of at least one latent cell (8 px), OpenCV DIS's minimum, 2 frames for flow,
  no empty batch.
- Models: SD1.x, SD2.x and SDXL UNets, whose latents have 4 channels.
- Sources: INVERSION and TRAJECTORIES carry a fingerprint (strided samples) of the latent they were made from,
  and the inversion the sampling (prediction type, σ range) of the model that made it. ``same_sources`` checks
  them against each other when a node adds one to a MODEL's method stack; ``sampling_run``, called by the
  stack's OUTER_SAMPLE wrapper before the first step, refuses a start latent that is not the inversion's latent at the σ where sampling
  starts (or where an earlier run with it ended: an edit sampled in two stages), new noise on it, a model that
  samples differently, or trajectories of another latent than the one being inverted.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Any, Callable, Mapping, Sequence

import safetensors
import torch

from typing import TYPE_CHECKING

from ..flow.estimate import FlowField
from ..flow.trajectories import Trajectories
from . import host
from .frame_windows import FrameWindows

if TYPE_CHECKING:
    from .inversion import Inversion

LATENT_CELL = 8                 # image pixels per latent cell of the SD1.x / SD2.x / SDXL VAEs
LATENT_CHANNELS = 4             # channels of their latents
SUPPORTED_MODELS = "SD1.x, SD2.x and SDXL"
DIS_MIN_SIZE = 12               # px per side below which OpenCV's DIS (MEDIUM preset, 12 px patches) fails
FINGERPRINT_SAMPLES = 64        # strided samples per frame
FINGERPRINT_RTOL = 0.02         # relative to |value| + the frame's RMS: 5× the rounding of a bf16 cast


# ---------------------------------------------------------------------------------------------- numbers
def integer(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    _in_range(value, name, "an integer", minimum, maximum)
    return value


def number(value: Any, name: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """``value`` as a float if it is a finite number in [minimum, maximum] (NaN passes ComfyUI's own range check)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    _in_range(value, name, "a number", minimum, maximum)
    return float(value)


def _in_range(value: float, name: str, what: str, minimum: float | None, maximum: float | None) -> None:
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f"in [{minimum}, {maximum}]" if minimum is not None and maximum is not None
                  else f"at least {minimum}" if minimum is not None else f"at most {maximum}")
        raise ValueError(f"{name}: expected {what} {bounds}, got {value}")


def boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected a boolean, got {value!r}")
    return value


def percent_range(start: Any, end: Any, start_name: str = "start_percent", end_name: str = "end_percent"
                  ) -> tuple[float, float]:
    """A fraction of the sampling steps [start, end] within [0, 1]."""
    start, end = number(start, start_name, 0.0, 1.0), number(end, end_name, 0.0, 1.0)
    if start > end:
        raise ValueError(f"{start_name}: {start} is after {end_name} {end}")
    return start, end


def choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def finite(x: torch.Tensor, name: str, hint: str = "") -> torch.Tensor:
    """``x`` if it holds no NaN/Inf; else an error counting them (``hint``: the likely cause). One float32 sum
    decides (NaN/Inf propagate); only a non-finite sum is followed by a count, in chunks (no full-size mask)."""
    if not x.is_floating_point() or bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return x
    bad = sum(int((~torch.isfinite(chunk)).sum()) for chunk in x.reshape(-1).split(1 << 24))
    if bad:
        raise ValueError(f"{name}: {bad} of {x.numel()} values are NaN or infinite{hint}")
    return x


# ---------------------------------------------------------------------------------------------- frames, latents, flow
NAN_FRAMES = " (an fp16 VAE decode can produce NaN: try a fp32 VAE or --fp32-vae)"


def frames(images: Any, name: str, min_frames: int = 1, min_size: int = LATENT_CELL,
           reason: str = "one latent cell") -> torch.Tensor:
    """IMAGE frames (F, H, W, 3) of floats: at least ``min_frames`` frames of at least ``min_size`` px a side
    (``reason`` says why), all finite."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name}: expected IMAGE frames (F, H, W, 3), got {got}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected float IMAGE values in [0, 1], got {images.dtype}")
    count, height, width, _ = images.shape
    if count < min_frames:
        need = "at least one frame" if min_frames == 1 else f"at least {min_frames} frames"
        raise ValueError(f"{name}: {'is empty (0 frames)' if count == 0 else f'has {count} frame(s)'}; "
                         f"{need} needed")
    if min(height, width) < min_size:
        raise ValueError(f"{name}: frames are {width}x{height} px; at least {min_size}x{min_size} px needed "
                         f"({reason})")
    return finite(images, name, NAN_FRAMES)


def latent(value: Any, name: str, min_frames: int = 1, channels: int = LATENT_CHANNELS,
           check_values: bool = True) -> torch.Tensor:
    """The ``samples`` (F, C, h, w) of a LATENT: image latents of ``channels`` channels, at least ``min_frames``
    frames and one cell, finite (unless only the shape is used)."""
    if not isinstance(value, dict) or not isinstance(value.get("samples"), torch.Tensor):
        raise ValueError(f"{name}: expected a LATENT (a dict with 'samples'), got {type(value).__name__}")
    samples = value["samples"]
    if samples.ndim != 4:
        raise ValueError(f"{name}: expected image latents (F, C, h, w), got shape {tuple(samples.shape)} "
                         "(a video-model latent?)")
    count, c, h, w = samples.shape
    if count < min_frames:
        raise ValueError(f"{name}: {'is empty (0 frames)' if count == 0 else f'has {count} frame(s)'}; at least "
                         f"{min_frames} needed")
    if c != channels:
        raise ValueError(f"{name}: has {c}-channel latents ({_latent_kind(c)}); TVE edits with {SUPPORTED_MODELS} "
                         f"models, whose latents have {channels} channels (VAEEncode / EmptyLatentImage of such a "
                         "checkpoint)")
    if h < 1 or w < 1:
        raise ValueError(f"{name}: latents are {w}x{h} cells; frames of at least {LATENT_CELL} px a side needed")
    return finite(samples, name, " (NaN frames or an fp16 VAE encode?)") if check_values else samples


def _latent_kind(channels: int) -> str:
    return {16: "SD3 / Flux", 128: "LTX-Video"}.get(channels, "not SD1.x/SD2.x/SDXL")


def flow(value: FlowField, name: str) -> FlowField:
    for part in ("forward", "backward"):
        finite(getattr(value, part), name, f" in its {part} flow (RAFT in half precision can overflow: try "
                                           "method 'dis' or fp32)")
    return value


# ---------------------------------------------------------------------------------------------- frames of a run
def frame_count(count: int, expected: int, name: str, source: str) -> None:
    """``name`` holds ``count`` frames; ``source`` (what it must match) has ``expected``."""
    if count != expected:
        raise ValueError(f"{name}: has {count} frames but {source} has {expected}; use the frames of one video "
                         "for both")


def frames_within(frame_ids: Sequence[int], frames: int, name: str, source: str) -> None:
    """Every global frame id of a UNet call lies among the ``frames`` frames ``source`` was made for."""
    if max(frame_ids) >= frames:
        raise ValueError(f"{name}: {source} has {frames} frames but frame {max(frame_ids)} is being sampled; "
                         "build it from the same video")


def frame_in_call(frame: int, frame_ids: Sequence[int], name: str) -> int:
    """Local index of global ``frame`` among the frames of this call (a context window may hold only some)."""
    if frame not in frame_ids:
        raise ValueError(f"{name}: frame {frame} is not among the frames of this call "
                         f"({frame_ids[0]}..{frame_ids[-1]}, {len(frame_ids)} frames); pick a frame of the video (frames count from 0) that every "
                         "context window contains")
    return list(frame_ids).index(frame)


def latent_fits_trajectories(latent_image: torch.Tensor, trajectories: Trajectories) -> None:
    """A sampled latent has the size and frame count the trajectories were built for."""
    hw = tuple(latent_image.shape[-2:])
    if hw != tuple(trajectories.latent_hw):
        raise ValueError(f"trajectories: built for a {trajectories.latent_hw[1]}x{trajectories.latent_hw[0]} latent "
                         f"but a {hw[1]}x{hw[0]} latent is sampled; build them with TVE_FlowTrajectories from this "
                         "latent")
    if latent_image.shape[0] != trajectories.frames:
        raise ValueError(f"trajectories: built for {trajectories.frames} frames but the latent has "
                         f"{latent_image.shape[0]}; use the same frames for the flow and the latent")


def call_fits_inversion(x_in: torch.Tensor, frame_ids: Sequence[int], windowed: bool, frames: int,
                        latent_shape: tuple[int, ...]) -> None:
    """One UNet call's latents (n, C, h, w) of global ``frame_ids`` against the inversion's (frames, C, h, w)."""
    if tuple(x_in.shape[1:]) != tuple(latent_shape[1:]):
        raise ValueError(f"latent: the sampled latent is {tuple(x_in.shape[1:])} per frame but the inversion's is "
                         f"{tuple(latent_shape[1:])}; sample the inverted latent")
    if not windowed and x_in.shape[0] != frames:
        raise ValueError(f"latent: {x_in.shape[0]} frames are sampled but the inversion has {frames}")
    frames_within(frame_ids, frames, "latent", "the inversion")


def frame_windows(size: Any, overlap: Any) -> FrameWindows:
    """The Frame Windows (TVE) setting: frames per window (0: all) and the overlap of windows, below the size."""
    integer(size, "frames_per_window", 0)
    integer(overlap, "overlap", 0)
    if size and overlap >= size:
        raise ValueError(f"overlap: expected fewer frames than frames_per_window ({size}), got {overlap}")
    return FrameWindows(size, overlap)


def control_hints(control: Any, video_frames: int | None) -> None:
    """Every control of a chain (ControlNet, T2I-Adapter) has one hint image per video frame, or one for all."""
    for count in host.control_hint_counts(control):
        if count not in (1, video_frames):
            raise ValueError(f"control: a ControlNet / T2I-Adapter has {count} hint images but the video has "
                             f"{video_frames} frames; give it one image per frame (or a single image)")


# ---------------------------------------------------------------------------------------------- inversions
def inversion_schedule(inversion: "Inversion", sigmas: torch.Tensor) -> None:
    """Before sampling: every σ of the sampler's schedule is a grid σ of the inversion (part of the grid, e.g. from
    a later start step, is fine); the sampler may evaluate between them."""
    for sigma in sigmas.reshape(-1).tolist():
        inversion.index_of(float(sigma))


def inversion_fits_model(inversion: "Inversion", model: Any) -> None:
    """The model is of the inverting model's family and samples as it did (its *patched* model_sampling)."""
    family = host.model_family(model)
    if family != inversion.family:
        raise ValueError(f"inversion: made with a {inversion.family} model but this model is {family}; invert the "
                         "frames with the model you edit with")
    sampling = host.effective_sampling(model)
    if not sampling.matches(inversion.sampling):
        raise ValueError(f"model: samples {sampling} but the inversion was made with a model that samples "
                         f"{inversion.sampling}; give DDIM Inversion (TVE) and the sampler the same MODEL (a "
                         "ModelSamplingDiscrete node on only one of the two wires changes the sampling)")


def inversion_latent(inversion: "Inversion", samples: torch.Tensor) -> None:
    if tuple(samples.shape) != inversion.latent_shape:
        raise ValueError(f"latent_image: shape {tuple(samples.shape)} differs from the inverted frames' "
                         f"{inversion.latent_shape}; use the inversion's latent")


def inversion_start(inversion: "Inversion", model: Any, noise: torch.Tensor, latent_image: torch.Tensor,
                    sigmas: torch.Tensor) -> None:
    """Before the first step of sampling ``model`` (raw ``latent_image``, ``noise``, σ grid ``sigmas``): the model
    samples as the inverting one did, no new noise, and the start latent is the inversion's latent at the σ where
    sampling starts (x_T at the top of the grid; part-way down, e.g. after SplitSigmas, the inversion's latent at
    that σ or one an earlier run with it ended at, ``Inversion.remember_end``)."""
    inversion_fits_model(inversion, model)
    if bool(noise.ne(0).any()):
        raise ValueError("noise: the sampler adds new noise to the inverted latent, which then no longer "
                         "inverts the video; connect DisableNoise (SamplerCustomAdvanced) or set add_noise to "
                         "disable (KSamplerAdvanced)")
    inversion_latent(inversion, latent_image)
    i = inversion.index_of(float(sigmas[0]))
    start = fingerprint(host.process_latent_in(model, latent_image.float()))
    if same_fingerprint(start, inversion.trace[i]) or any(same_fingerprint(start, end)
                                                          for end in inversion.ends.get(i, ())):
        return
    where = f"σ={float(inversion.sigmas[i]):.4g} (step {i} of {len(inversion.sigmas) - 1})"
    if same_fingerprint(start, inversion.trace[-1]):
        got = "the clean VAE latent of the frames, not the inverted one"
    elif i > 0 and same_fingerprint(start, inversion.trace[0]):
        got = "the inversion's x_T, but sampling starts part-way down the grid"
    else:
        got = "a latent this inversion did not make (another video, or another inversion)"
    raise ValueError(f"latent_image: sampling starts at {where} from {got}; connect the inverted_latent output "
                     "of the DDIM Inversion (TVE) whose inversion this model uses to the sampler's latent, and "
                     "sample with its sigmas")


# ---------------------------------------------------------------------------------------------- models
def model(value: Any, name: str = "model", patched: bool = True) -> Any:
    """A MODEL TVE can use: 4-channel latents and, when TVE patches its attention (``patched``), a UNet with
    self-attention blocks (SD1.x, SD2.x, SDXL)."""
    channels = host.latent_channels(value)
    if channels != LATENT_CHANNELS:
        raise ValueError(f"{name}: this is a {host.model_family(value)} model with {channels}-channel latents; TVE "
                         f"supports {SUPPORTED_MODELS} UNet models ({LATENT_CHANNELS}-channel latents)")
    if patched:
        host.attention_blocks(value)             # refuses a model that is not a UNet, naming the families
    return value


def latent_for_model(samples: torch.Tensor, value: Any, name: str) -> torch.Tensor:
    channels = host.latent_channels(value)
    if samples.shape[1] != channels:
        raise ValueError(f"{name}: has {samples.shape[1]} channels but the model samples {channels}-channel "
                         "latents; encode the frames with this checkpoint's VAE")
    return samples


# ---------------------------------------------------------------------------------------------- fingerprints
def fingerprint(x: torch.Tensor) -> torch.Tensor:
    """(F, ...) → (F, k) float32 on the CPU: ``FINGERPRINT_SAMPLES`` evenly strided values of every frame."""
    flat = x.detach().reshape(x.shape[0], -1)
    index = torch.linspace(0, flat.shape[1] - 1, min(FINGERPRINT_SAMPLES, flat.shape[1])).round().long()
    return flat[:, index.to(flat.device)].float().cpu()


def same_fingerprint(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two fingerprints are of one tensor, up to casts to fp16/bf16 and back."""
    if a is None or b is None or a.shape != b.shape:
        return False
    scale = b.square().mean(1, keepdim=True).sqrt()                          # (F, 1) RMS of each frame
    return bool(((a - b).abs() <= FINGERPRINT_RTOL * (b.abs() + scale) + 1e-6).all())


def same_sources(sources: Sequence[Any]) -> None:
    """The INVERSION and TRAJECTORIES on one MODEL, in the order their nodes were applied, were made from the same
    latent (checked when the model's method stack is built: the node that adds one refuses a mismatch, naming it)."""
    for i, a in enumerate(sources):
        for b in sources[:i]:
            fa, fb = getattr(a, "source", None), getattr(b, "source", None)
            if fa is not None and fb is not None and not same_fingerprint(fa, fb):
                raise ValueError(f"{'trajectories' if isinstance(a, Trajectories) else 'inversion'}: made from "
                                 f"another latent than {_describe(b)} already on this model; build the flow, the "
                                 "trajectories and the inversion from the same VAEEncode LATENT of the same video")


def _describe(source: Any) -> str:
    return "the trajectories (Flow Trajectories (TVE))" if isinstance(source, Trajectories) else \
        "the inversion (DDIM Inversion (TVE))"


def sampling_run(patcher: Any, noise: torch.Tensor, latent_image: torch.Tensor, sigmas: torch.Tensor,
                 inversion: Any, trajectories: Sequence[Trajectories], inverting: bool) -> None:
    """Before the first step of a sampling run of a TVE model (its stack's OUTER_SAMPLE wrapper): the sampled latent,
    then its sources. Inverting: the trajectories were built on the latent being inverted. Editing: the inversion's
    ``inversion_start`` (same sampling, no new noise, the start latent is the inversion's at the start σ)."""
    if host.multigpu_clones(patcher):
        raise ValueError("model: MultiGPU CFG Split spreads each step's conds over several GPUs, but a TVE model runs "
                         "its passes of one step (source, keyframes, edit) on one device, each reading what the "
                         "previous one left; remove MultiGPU CFG Split from this model's chain (TVE samples on one "
                         "GPU)")
    if inverting:                                # the inversion checked its latent already
        for source in trajectories:
            if source.source is not None and not same_fingerprint(fingerprint(latent_image), source.source):
                raise ValueError("trajectories: built on another latent than the one DDIM Inversion (TVE) inverts; "
                                 "connect the same VAEEncode LATENT to Flow Trajectories (TVE) and DDIM Inversion "
                                 "(TVE)")
        return
    latent({"samples": latent_image}, "latent_image", channels=host.latent_channels(patcher))
    if inversion is not None:
        inversion_start(inversion, patcher, noise, latent_image, sigmas)


# ==============================================================================================================
# Files, masks and model identity (issue 24). New functions only.
# ==============================================================================================================
# ---------------------------------------------------------------------------------------------- safetensors files
_PICKLE_START = b"\x80"                    # pickle protocol 2+ (torch.save before 1.6, plain pickles)
_ZIP_START = b"PK\x03\x04"                 # torch.save since 1.6 (a zip archive)


def read_safetensors(path: str, name: str, what: str, remedy: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of the safetensors file ``path``, given on input ``name``; one ValueError saying what
    the file is instead (empty, a pickle or torch zip renamed, truncated, extended, an unreadable header) when it
    cannot be read. ``what`` names the file type expected, ``remedy`` says what to do."""
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return metadata, tensors
    except Exception as e:                 # safetensors' SafetensorError, OSError, ...
        raise ValueError(f"{name}: {path} {_unreadable(path, e)}; expected {what}; {remedy}") from e


def _unreadable(path: str, error: Exception) -> str:
    """What a file safetensors could not open is, from its first bytes and its header."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            header = f.read(n) if n is not None and 8 + n <= size else None
    except OSError as e:
        return f"could not be read ({e})"
    if size == 0:
        return "is an empty file (0 bytes)"
    if head.startswith(_ZIP_START):
        return "is a PyTorch zip checkpoint (torch.save), not a safetensors file"
    if head.startswith(_PICKLE_START):
        return "is a Python pickle (an old torch.save checkpoint?), not a safetensors file"
    if n is None:
        return f"is {size} bytes long, shorter than a safetensors header"
    if header is None:
        if n > 100_000_000:
            return "is not a safetensors file (its first 8 bytes are no header length)"
        return f"is truncated: {size} bytes, but its header alone says {8 + n}"
    try:
        entries = json.loads(header.decode("utf-8"))
        end = max((int(v["data_offsets"][1]) for k, v in entries.items() if k != "__metadata__"), default=0)
    except Exception:
        return "is not a safetensors file (its header is not safetensors JSON)"
    expected = 8 + n + end
    if size < expected:
        return f"is truncated: {size} bytes, but its header describes {expected}"
    if size > expected:
        return f"is damaged: {size - expected} bytes follow its last tensor ({expected} expected)"
    detail = str(error).splitlines()[0] if str(error) else "no message"
    return f"could not be read as safetensors ({type(error).__name__}: {detail})"


# ---------------------------------------------------------------------------------------------- temporal adapter files
_BLOCK_NAME = re.compile(r"^(input|middle|output)\.\d+\.\d+$")
_QUERY_KEY = re.compile(r"^diffusion_model\..+\.attn[12]\.to_q\.weight$")


def metadata_field(metadata: Mapping[str, str], field: str, prefix: str, expected: str) -> str:
    """A metadata string that must be there; ``prefix`` names the input and file."""
    if field not in metadata:
        raise ValueError(f"{prefix}: its metadata has no '{field}'; expected {expected}")
    return metadata[field]


def bad_metadata(prefix: str, field: str, value: str, expected: str) -> ValueError:
    """The error for a metadata field that is there but wrong."""
    shown = value if len(value) <= 80 else value[:77] + "..."
    return ValueError(f"{prefix}: its metadata '{field}' is {shown!r}; expected {expected}")


def metadata_choice(metadata: Mapping[str, str], field: str, prefix: str, choices: Sequence[str]) -> str:
    value = metadata_field(metadata, field, prefix, f"one of {list(choices)}")
    if value not in choices:
        raise bad_metadata(prefix, field, value, f"one of {list(choices)}")
    return value


def metadata_count(metadata: Mapping[str, str], field: str, prefix: str) -> int:
    """A whole number ≥ 0 written as decimal digits."""
    value = metadata_field(metadata, field, prefix, "a whole number (decimal digits)")
    if not value.isascii() or not value.isdigit():
        raise bad_metadata(prefix, field, value, "a whole number (decimal digits)")
    return int(value)


def metadata_json(metadata: Mapping[str, str], field: str, prefix: str, expected: str) -> Any:
    value = metadata_field(metadata, field, prefix, expected)
    try:
        return json.loads(value)
    except ValueError:
        raise bad_metadata(prefix, field, value, f"{expected} (it is not valid JSON)") from None


def metadata_numbers(metadata: Mapping[str, str], field: str, prefix: str) -> tuple[float, ...]:
    """A JSON list of finite numbers."""
    expected = "a JSON list of finite numbers"
    values = metadata_json(metadata, field, prefix, expected)
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               and math.isfinite(v) for v in values):
        raise bad_metadata(prefix, field, metadata[field], expected)
    return tuple(float(v) for v in values)


def metadata_blocks(metadata: Mapping[str, str], field: str, prefix: str) -> dict[str, tuple[int, int]]:
    """``{block name: [channels, heads]}``: one entry or more, names like 'input.1.0', positive channels divisible
    by a positive number of heads."""
    expected = "a JSON object {block name: [channels, heads]}, e.g. {\"input.1.0\": [320, 8]}"
    raw = metadata_json(metadata, field, prefix, expected)
    if not isinstance(raw, dict) or not raw:
        raise bad_metadata(prefix, field, metadata[field], expected)
    blocks = {}
    for name, entry in raw.items():
        if not _BLOCK_NAME.match(name):
            raise ValueError(f"{prefix}: its metadata '{field}' names a block {name!r}; expected transformer block "
                             "names <input|middle|output>.<block>.<index>, e.g. 'input.1.0'")
        if (not isinstance(entry, list) or len(entry) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in entry)
                or entry[0] % entry[1]):
            raise ValueError(f"{prefix}: its metadata '{field}' gives block {name} {entry!r}; expected [channels, "
                             "heads]: positive whole numbers, the channels a multiple of the heads")
        blocks[name] = (entry[0], entry[1])
    return blocks


def adapter_tensor(t: torch.Tensor, key: str, shape: tuple[int, ...], prefix: str, why: str) -> torch.Tensor:
    """One tensor of an adapter file as float32: of ``shape`` (``why`` says where it comes from), floating point,
    finite."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{prefix}: its tensor '{key}' has shape {tuple(t.shape)}; expected {tuple(shape)} ({why})")
    if not t.is_floating_point():
        raise ValueError(f"{prefix}: its tensor '{key}' holds {t.dtype} values; expected floating-point weights")
    t = t.float()
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{prefix}: its tensor '{key}' has {bad} of {t.numel()} values NaN or infinite; expected "
                         "finite weights (a damaged file, or tuning that diverged: tune again with a lower "
                         "learning_rate)")
    return t


def adapter_tensor_names(tensors: Mapping[str, torch.Tensor], prefix: str, groups: Sequence[str]) -> None:
    """Every tensor name starts with one of ``groups`` (e.g. 'temporal.', 'query.')."""
    for key in tensors:
        if not any(key.startswith(g) for g in groups):
            raise ValueError(f"{prefix}: holds a tensor '{key}' that is not part of a temporal adapter; expected "
                             f"only tensors named {', '.join(g + '…' for g in groups)}")


def temporal_tensors(tensors: Mapping[str, torch.Tensor], blocks: Mapping[str, tuple[int, int]], kind: str,
                     expected: Callable[[int], Mapping[str, tuple[int, ...]]], prefix: str
                     ) -> dict[str, dict[str, torch.Tensor]]:
    """The ``temporal.<block>.<parameter>`` tensors: for every listed block exactly the parameters ``expected``
    (channels) of a ``kind`` temporal attention, of their shapes; nothing for unlisted blocks."""
    temporal: dict[str, dict[str, torch.Tensor]] = {name: {} for name in blocks}
    for key, t in tensors.items():
        if not key.startswith("temporal."):
            continue
        name, _, param = key[len("temporal."):].rpartition(".")
        if name not in blocks:
            listed = ", ".join(list(blocks)[:4]) + (", …" if len(blocks) > 4 else "")
            raise ValueError(f"{prefix}: holds '{key}' for a block {name!r} its 'blocks' metadata does not list "
                             f"(it lists {listed}); expected temporal.<listed block>.<parameter>")
        channels, heads = blocks[name]
        shapes = expected(channels)
        if param not in shapes:
            raise ValueError(f"{prefix}: holds '{key}', a parameter a '{kind}' temporal attention does not have; "
                             f"expected {sorted(shapes)}")
        temporal[name][param] = adapter_tensor(t, key, shapes[param], prefix,
                                               f"a '{kind}' temporal attention of {channels} channels")
    for name, (channels, _) in blocks.items():
        missing = sorted(set(expected(channels)) - set(temporal[name]))
        if missing:
            raise ValueError(f"{prefix}: lacks {', '.join(f'temporal.{name}.{p}' for p in missing[:3])}"
                             f"{' …' if len(missing) > 3 else ''}; a '{kind}' temporal attention of block {name} "
                             f"needs {sorted(expected(channels))}")
    return temporal


def query_tensors(tensors: Mapping[str, torch.Tensor], blocks: Mapping[str, tuple[int, int]], trainable: str,
                  prefix: str) -> dict[str, torch.Tensor]:
    """The ``query.<weight key>`` tensors: none when only the temporal attention was tuned; else one 2-D delta per
    self- and cross-attention query projection of every block (Tune-A-Video's trainable set). Whether they fit a
    model is ``query_diffs_fit``'s question."""
    diffs = {}
    for key, t in tensors.items():
        if not key.startswith("query."):
            continue
        weight_key = key[len("query."):]
        if not _QUERY_KEY.match(weight_key):
            raise ValueError(f"{prefix}: holds '{key}', which is not a query projection weight; expected "
                             "query.diffusion_model.<block path>.attn1|attn2.to_q.weight")
        if t.ndim != 2:
            raise ValueError(f"{prefix}: its tensor '{key}' has shape {tuple(t.shape)}; expected a 2-D weight delta")
        diffs[weight_key] = adapter_tensor(t, key, tuple(t.shape), prefix, "")
    if trainable == "temporal" and diffs:
        raise ValueError(f"{prefix}: is marked trainable 'temporal' but holds {len(diffs)} query deltas; expected "
                         "none (or trainable 'temporal+queries')")
    if trainable != "temporal" and len(diffs) != 2 * len(blocks):
        raise ValueError(f"{prefix}: holds {len(diffs)} query deltas; a '{trainable}' adapter of {len(blocks)} "
                         f"blocks has {2 * len(blocks)} (attn1 and attn2 of each)")
    return diffs


def query_diffs_fit(diffs: Mapping[str, torch.Tensor], blocks: Sequence[str], shapes: Mapping[str, Any],
                    prefix: str) -> None:
    """Before anything is patched: the query deltas are those of the model's query projections ``blocks`` (their
    weight keys), of the shapes ``shapes`` (host.weight_shapes) of its weights; otherwise comfy would drop a delta
    of another shape at load time with only a console line."""
    unknown = [key for key in diffs if key not in blocks]
    if unknown:
        raise ValueError(f"{prefix}: holds a query delta for {unknown[0]}, which is not a query projection of this "
                         "model's transformer blocks; load it onto the model it was tuned on")
    for key, diff in diffs.items():
        if shapes.get(key) != tuple(diff.shape):
            raise ValueError(f"{prefix}: its query delta for {key} is {tuple(diff.shape)} but this model's weight is "
                             f"{shapes.get(key)}; load it onto the model it was tuned on")


# ---------------------------------------------------------------------------------------------- noise masks
MASK_ASPECT_RTOL = 0.02             # VAEEncode crops < 8 px a side: a mask of the uncropped frames is kept


def noise_mask(mask: Any, latent_shape: Sequence[int], name: str) -> None:
    """A LATENT's ``noise_mask`` (SetLatentNoiseMask: (N, 1, H, W) or (N, H, W)) core samplers can use as meant:
    finite values in [0, 1] (``noise_mask_values``), one mask for all frames or one per frame (core repeats or cuts
    N masks to the frame count without a word: 4 masks on 6 frames give frames 4–5 the masks of frames 0–1), and
    the frames' aspect (core stretches the mask to the latent). ``name`` is the LATENT input; None (no mask)
    passes."""
    if mask is None:
        return
    noise_mask_values(mask, name)
    frames_, h, w = int(latent_shape[0]), int(latent_shape[-2]), int(latent_shape[-1])
    height, width = mask.shape[-2:]
    count = mask.numel() // (height * width)
    if count not in (1, frames_):
        raise ValueError(f"{name}: its noise_mask has {count} masks but the latent has {frames_} frames; expected "
                         f"one mask per frame ({frames_}) or one for all frames (core would "
                         f"{'repeat' if count < frames_ else 'cut'} them without a word)")
    ratio = (width / height) / (w / h)
    if abs(ratio - 1) > max(MASK_ASPECT_RTOL, 1 / min(h, w)):
        raise ValueError(f"{name}: its noise_mask is {width}x{height} but the frames are {w}x{h} latent cells "
                         f"({w * LATENT_CELL}x{h * LATENT_CELL} px); core would stretch it; expected a mask of the "
                         "frames' aspect (made at the frames' size)")


def sampled_noise_mask(mask: Any, latent_shape: Sequence[int], name: str) -> None:
    """The ``denoise_mask`` a sampling run's OUTER_SAMPLE wrapper is given: the LATENT's mask as it is (ComfyUI
    0.3.x: checked as ``noise_mask``) or already resized and repeated to the latent's shape by the sampler (later
    releases: its frame count tells nothing more, its values are checked)."""
    if mask is not None and isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(latent_shape):
        noise_mask_values(mask, name)
    else:
        noise_mask(mask, latent_shape, name)


def noise_mask_values(mask: Any, name: str) -> None:
    """A noise mask (as given, or as core prepared it for sampling: resized and repeated to the latent, so its
    frame count tells nothing) is a float tensor of finite values in [0, 1]; None (no mask) passes. One min/max
    reduction (one device→host sync)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.ndim < 2 or mask.numel() == 0:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name}: its noise_mask is {got}; expected a MASK (frames, height, width) "
                         "(SetLatentNoiseMask)")
    if not mask.is_floating_point():
        raise ValueError(f"{name}: its noise_mask holds {mask.dtype} values; expected floats in [0, 1]")
    low, high = torch.aminmax(mask.float())
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = int((~torch.isfinite(mask)).sum())
        raise ValueError(f"{name}: its noise_mask has {bad} of {mask.numel()} values NaN or infinite; expected "
                         "values in [0, 1] (1 = edit, 0 = keep)")
    if low < 0 or high > 1:
        raise ValueError(f"{name}: its noise_mask holds values from {low:.4g} to {high:.4g}; expected values in "
                         "[0, 1] (1 = edit, 0 = keep)")


# ---------------------------------------------------------------------------------------------- model identity
WEIGHTS_RTOL = 2.0 ** -7            # 4× bf16's largest rounding (2^-9): fp16/bf16 casts pass, fp8's 2^-4 does not
WEIGHTS_ATOL = 1e-7                 # fp16's subnormal spacing is 6e-8


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(((a - b).abs() <= WEIGHTS_RTOL * b.abs() + WEIGHTS_ATOL).all())


def weights_difference(recorded: Any, current: Any) -> str | None:
    """None when two ``host.WeightsFingerprint`` are of the same weights (up to a cast to fp16/bf16 and back),
    else what differs, in words."""
    if recorded.layout != current.layout:
        return "a UNet of another layout (another architecture or block layout)"
    if not _close(current.base, recorded.base):
        return "other base weights (another checkpoint of the same layout: a fine-tune, merge or fp8 load)"
    if recorded.patches != current.patches or not _close(current.patch_values, recorded.patch_values):
        return "other weight patches (a LoRA or other patch added, removed, or at another strength)"
    return None


def same_weights(recorded: Any, current: Any, name: str, made: str, remedy: str) -> None:
    """One error naming the input ``name`` when ``current`` (the model here) runs other weights than ``recorded``
    (``made``: what was made with it, e.g. "was made with a model"); ``remedy`` says what to do."""
    difference = _weights_difference_in_words(recorded, current)
    if difference is not None:
        raise ValueError(f"{name}: {made} whose weights differ from this model's: {difference}; {remedy}")


def _weights_difference_in_words(recorded: Any, current: Any) -> str | None:
    """``weights_difference`` with the weight counts of both sides where they differ."""
    difference = weights_difference(recorded, current)
    if difference is None or recorded.summary == current.summary:
        return difference
    return f"{difference} (there: {recorded.summary}; here: {current.summary})"


def inversion_weights(inversion: "Inversion", current: Any, node: str, allowed: bool) -> str | None:
    """An edit runs the weights the inversion was made with (``Inversion.weights``; ``current``: the
    ``host.weights_fingerprint`` of the model here); TVE's own patches are not weights. Otherwise one error naming
    the ``inversion`` wire and what differs, or, where the artist ``allowed`` it on ``node`` (its
    allow_other_weights: a style LoRA for the edit only), the note to say instead (None: the same weights)."""
    difference = _weights_difference_in_words(inversion.weights, current)
    if difference is None:
        return None
    if not allowed:
        raise ValueError(f"inversion: made with a model whose weights differ from this model's: {difference}; "
                         "invert with the MODEL you edit with (the same checkpoint, LoRAs and tuning), or turn on "
                         f"allow_other_weights on {node} to edit with other weights on purpose (e.g. a style LoRA "
                         "for the edit only)")
    return (f"{node}: edits with other weights than the inversion was made with: {difference}; allowed by "
            "allow_other_weights (the inverted video is then followed only approximately)")
