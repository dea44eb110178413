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
  them against each other when a node adds one to a MODEL's TVE state; ``sampling_run``, called by the state
  before the first step, refuses a start latent that is not the inversion's latent at the σ where sampling
  starts (or where an earlier run with it ended: an edit sampled in two stages), new noise on it, a model that
  samples differently, or trajectories of another latent than the one being inverted.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..flow.estimate import FlowField
from ..flow.trajectories import Trajectories
from . import host

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
    latent (checked when the model's TVE state is built: the node that adds one refuses a mismatch, naming it)."""
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
    """Before the first step of a sampling run of a TVE model (its state's OUTER_SAMPLE wrapper): the sampled latent,
    then its sources. Inverting: the trajectories were built on the latent being inverted. Editing: the inversion's
    ``check_run`` (same sampling, no new noise, the start latent is the inversion's at the start σ)."""
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
        inversion.check_run(patcher, noise, latent_image, sigmas)
