"""Forward and backward optical flow between consecutive frames, and occlusion by forward–backward consistency.

RAFT (Teed & Deng, ECCV 2020) is torchvision's architecture with a state dict the caller loads; its inputs are
[-1, 1] (torchvision's transforms), padded to a multiple of 8 and at least 128 px (the correlation pyramid's
minimum), and the last refinement iteration is kept. Its all-pairs correlation volume grows with the fourth power
of the frame size (~4 GB per flow at 1080p), so frames larger than ``max_size`` are downscaled (antialiased) for
the estimate and the flow is scaled back up, vectors included; FLATTEN's trajectories live on the latent grid
(1/8 of the frame), which a flow at 512 px resolves fully. A batch that runs out of memory is retried in halves.
DIS (Kroeger et al., ECCV 2016) is OpenCV's, tuned for sub-pixel accuracy. Occlusion: the forward–backward consistency check of Sundaram, Brox & Keutzer, ECCV 2010.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.optical_flow import RAFT, raft_large, raft_small

from .latent_crop import LatentCrop
from .warp import backward_warp

RAFT_VARIANTS = {"raft_large": raft_large, "raft_small": raft_small}
METHODS = (*RAFT_VARIANTS, "dis")
RAFT_MIN_SIZE = 128          # torchvision RAFT: feature maps (1/8) of at least 16 for its 4-level pyramid

# DIS: OpenCV's MEDIUM preset (8 px patches, 25 descent steps) refined down to full resolution (preset: half),
# patches every 4 px (preset 3), 10 variational iterations (preset 5) and smoothness 35 (preset 20). On the
# video world's 3°/frame rotations the mean end-point error drops from 0.13 px to ~0.07; more smoothness blurs
# sprite edges.
DIS_FINEST_SCALE = 0
DIS_PATCH_STRIDE = 4
DIS_REFINEMENT_ITERATIONS = 10
DIS_REFINEMENT_ALPHA = 35.0


@dataclass(frozen=True)
class FlowField:
    """The FLOW socket: flows between consecutive frames at image resolution."""
    forward: torch.Tensor        # (F-1, 2, H, W) float32, px (dx, dy), frame t -> t+1
    backward: torch.Tensor       # (F-1, 2, H, W) float32, frame t+1 -> t
    occlusion: torch.Tensor      # (F-1, H, W) bool, frame t pixel fails forward–backward consistency
    method: str
    crop: LatentCrop | None = None   # VAEEncode's crop the frames went through: (H, W) is its crop_hw

    def __post_init__(self) -> None:
        if self.forward.ndim != 4 or self.forward.shape[1] != 2:
            raise ValueError(f"flow: expected forward flow (F-1, 2, H, W), got shape {tuple(self.forward.shape)}")
        pairs, _, h, w = self.forward.shape
        if pairs < 1:
            raise ValueError("flow: expected at least one frame pair, got none")
        if self.backward.shape != self.forward.shape or self.occlusion.shape != (pairs, h, w):
            raise ValueError(f"flow: expected backward flow {tuple(self.forward.shape)} and occlusion "
                             f"{(pairs, h, w)}, got {tuple(self.backward.shape)} and {tuple(self.occlusion.shape)}")
        if self.crop is not None and self.crop.crop_hw != (h, w):
            raise ValueError(f"flow: {w}x{h} (w x h) is not the {self.crop.describe()} crop it names")

    @property
    def frames(self) -> int:
        return self.forward.shape[0] + 1

    @property
    def height(self) -> int:
        return self.forward.shape[2]

    @property
    def width(self) -> int:
        return self.forward.shape[3]


def build_raft(variant: str, state_dict: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """torchvision RAFT ``variant`` ("raft_large" | "raft_small") with ``state_dict`` loaded, in eval mode.

    Keys may carry a ``module.`` prefix (DataParallel checkpoints). A dict of the other variant or of another
    model raises a ValueError that says so.
    """
    if variant not in RAFT_VARIANTS:
        raise ValueError(f"variant: expected one of {list(RAFT_VARIANTS)}, got '{variant}'")
    state = dict(state_dict)
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    model = RAFT_VARIANTS[variant](weights=None, progress=False)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(key for key in set(expected) & set(state) if expected[key].shape != state[key].shape)
    problems = [f"{len(keys)} {what} (e.g. {', '.join(keys[:2])})" for what, keys in
                [("missing keys", missing), ("unexpected keys", unexpected), ("keys of another shape", wrong_shape)]
                if keys]
    if problems:
        raise ValueError(f"raft_weights: expected a torchvision {variant} state dict but found {'; '.join(problems)}; "
                         f"the file looks like {_looks_like(state)}")
    model.load_state_dict(state)
    return model.eval()


def is_raft(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a torchvision RAFT (either variant), the model :func:`estimate_flow` runs."""
    return isinstance(module, RAFT)


def _looks_like(state: Mapping[str, torch.Tensor]) -> str:
    """Which torchvision RAFT variant a state dict fits, for error messages."""
    for name, constructor in RAFT_VARIANTS.items():
        reference = constructor(weights=None, progress=False).state_dict()
        if set(reference) == set(state) and all(reference[k].shape == state[k].shape for k in reference):
            return f"a {name} checkpoint: choose method '{name}'"
    return "another model, not a torchvision RAFT checkpoint"


def estimate_flow(frames: torch.Tensor, method: str, raft: torch.nn.Module | None = None, batch_size: int = 8,
                  on_batch: Callable[[int, int], None] | None = None, max_size: int = 0,
                  on_out_of_memory: Callable[[], None] | None = None) -> FlowField:
    """Forward and backward flow of every consecutive pair of ``frames`` (F, H, W, 3) in [0, 1].

    method: "raft_large" | "raft_small" (``raft`` from :func:`build_raft`, run on its device and dtype) or
    "dis" (OpenCV, CPU). ``batch_size`` frame pairs per RAFT call (forward and backward flow of each pair in the
    same call); a call that raises ``torch.OutOfMemoryError`` is retried with half the pairs, after
    ``on_out_of_memory()`` (the host empties its cache there), down to one pair. ``max_size`` > 0: frames whose
    longer side exceeds it are estimated at that longer side (aspect kept) and the flow is resized back to
    (H, W) with its vectors scaled. ``on_batch(done, total)`` is called with the frame pairs done out of F-1.
    The result is float32 on the frames' device, at the frames' size.
    """
    if not isinstance(frames, torch.Tensor) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"frames: expected IMAGE frames (F, H, W, 3), got {shape}")
    if not frames.is_floating_point():
        raise ValueError(f"frames: expected float values in [0, 1], got {frames.dtype}")
    if frames.shape[0] < 2:
        raise ValueError(f"frames: optical flow needs at least 2 frames, got {frames.shape[0]}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got '{method}'")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    if max_size < 0:
        raise ValueError(f"max_size: expected 0 (full resolution) or a size in pixels, got {max_size}")
    size = tuple(frames.shape[1:3])
    work = flow_resolution(size, max_size)
    if method == "dis":
        forward, backward = _dis_flows(frames, work, on_batch)
    else:
        if raft is None:
            raise ValueError(f"raft: method '{method}' needs a RAFT module from build_raft, got None")
        forward, backward = _raft_flows(frames, raft, work, batch_size, on_batch, on_out_of_memory)
    forward, backward = resize_flow(forward, size), resize_flow(backward, size)
    return FlowField(forward=forward, backward=backward, occlusion=occlusion_from_consistency(forward, backward),
                     method=method)


def flow_resolution(size: tuple[int, int], max_size: int) -> tuple[int, int]:
    """(h, w) the flow of (H, W) frames is estimated at: the frames' own size, or the longer side ``max_size``."""
    height, width = size
    if max_size <= 0 or max(height, width) <= max_size:
        return height, width
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_flow(flow: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 2, h, w) px → (N, 2, H, W) px: bilinear resize, dx scaled by W/w and dy by H/h."""
    h, w = flow.shape[-2:]
    if (h, w) == tuple(size):
        return flow
    scale = torch.tensor([size[1] / w, size[0] / h], device=flow.device).view(1, 2, 1, 1)
    return F.interpolate(flow, size=size, mode="bilinear", align_corners=False) * scale


def raft_working_bytes(size: tuple[int, int], flows: int, element_size: int = 4) -> int:
    """An estimate of RAFT's working memory for ``flows`` flows at (h, w): the all-pairs correlation volume of
    the 1/8 feature maps and its 4-level pyramid (N² (1 + 1/4 + 1/16 + 1/64), N = h/8 · w/8), and ~1k channels
    of feature and context maps per cell."""
    cells = -(-(size[0] + _raft_padding(size[0])) // 8) * -(-(size[1] + _raft_padding(size[1])) // 8)
    return int(flows * element_size * (cells * cells * 1.33 + cells * 1024))


def occlusion_from_consistency(forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: pixels of the first frame whose forward flow the backward flow does not undo.

    Sundaram et al. 2010: with w_b sampled where w_f lands, occluded if |w_f + w_b|² > 0.01 (|w_f|² + |w_b|²) + 0.5;
    points landing outside the frame are occluded too. forward, backward (N, 2, H, W) px.
    """
    forward = forward.float()
    returned, inside = backward_warp(backward.float(), forward)           # w_b(x + w_f(x)), (N, 2, H, W)
    mismatch = (forward + returned).square().sum(1)                       # (N, H, W)
    scale = forward.square().sum(1) + returned.square().sum(1)
    return (mismatch > 0.01 * scale + 0.5) | ~inside


def _raft_flows(frames: torch.Tensor, raft: torch.nn.Module, size: tuple[int, int], batch_size: int,
                on_batch: Callable[[int, int], None] | None, on_out_of_memory: Callable[[], None] | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(F-1, 2, h, w) forward and backward float32 flows from RAFT at ``size`` (h, w), batched over frame pairs;
    a batch that runs out of memory is retried with half as many pairs."""
    parameter = next(raft.parameters())
    device, dtype = parameter.device, parameter.dtype
    pairs = frames.shape[0] - 1
    height, width = size
    pad_h, pad_w = _raft_padding(height), _raft_padding(width)
    padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)    # left, right, top, bottom
    low_precision = dtype in (torch.float16, torch.bfloat16)                # torchvision RAFT needs autocast there

    def prepare(index: torch.Tensor) -> torch.Tensor:
        x = frames[index].to(device).permute(0, 3, 1, 2).float()                   # (B, 3, H, W)
        x = resize_frames(x, size).to(dtype).contiguous()                           # (B, 3, h, w), NCHW in memory
        return F.pad(x * 2 - 1, padding, mode="replicate")                          # [-1, 1], (B, 3, h', w')

    def run(start: int, stop: int) -> torch.Tensor:
        t = torch.arange(start, stop)
        image1 = prepare(torch.cat([t, t + 1]))                 # forward pairs t → t+1, then backward t+1 → t
        image2 = prepare(torch.cat([t + 1, t]))
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=low_precision):
            flow = raft(image1, image2)[-1]                                  # last refinement, (2B, 2, h', w')
        flow = flow[:, :, padding[2]:padding[2] + height, padding[0]:padding[0] + width]
        return flow.float().to(frames.device)

    forward, backward = [], []
    start = 0
    while start < pairs:
        stop = min(start + batch_size, pairs)
        try:
            flow = run(start, stop)
        except torch.OutOfMemoryError as error:
            if batch_size == 1:
                raise torch.OutOfMemoryError(
                    f"RAFT ran out of memory on a single frame pair at {width}x{height}; lower max_resolution or "
                    "use method 'dis'") from error
            flow = None
        if flow is None:                                  # outside the except block: the failed batch is freed
            batch_size = max(1, batch_size // 2)
            if on_out_of_memory is not None:
                on_out_of_memory()
            continue
        forward.append(flow[:stop - start])
        backward.append(flow[stop - start:])
        start = stop
        if on_batch is not None:
            on_batch(stop, pairs)
    return torch.cat(forward), torch.cat(backward)


def resize_frames(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) float → (B, C, h, w): antialiased bilinear (an area-like filter when shrinking)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def _raft_padding(size: int) -> int:
    return max(RAFT_MIN_SIZE, -(-size // 8) * 8) - size


def opencv():
    """``cv2``, imported only where DIS runs: without a working OpenCV every other method and node still loads."""
    try:
        import cv2
    except ImportError as error:                     # also a wheel whose shared libraries (libGL) are missing
        raise RuntimeError(f"method: 'dis' needs OpenCV, which does not import here ({error}); install it with "
                           "ComfyUI's Python (pip install opencv-python) or use a RAFT method") from error
    return cv2


def _dis_flows(frames: torch.Tensor, size: tuple[int, int], on_batch: Callable[[int, int], None] | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(F-1, 2, h, w) forward and backward float32 flows from OpenCV DIS on uint8 grayscale frames at ``size``."""
    cv2 = opencv()

    def gray(image: torch.Tensor) -> np.ndarray:                            # (H, W, 3) → (h, w) uint8
        small = resize_frames(image.detach().float().cpu().permute(2, 0, 1)[None], size)[0].permute(1, 2, 0)
        rgb = (small.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    dis.setFinestScale(DIS_FINEST_SCALE)
    dis.setPatchStride(DIS_PATCH_STRIDE)
    dis.setVariationalRefinementIterations(DIS_REFINEMENT_ITERATIONS)
    dis.setVariationalRefinementAlpha(DIS_REFINEMENT_ALPHA)
    pairs = frames.shape[0] - 1
    forward, backward = [], []
    previous = gray(frames[0])
    for t in range(pairs):
        current = gray(frames[t + 1])
        forward.append(dis.calc(previous, current, None))                  # (h, w, 2) float32
        backward.append(dis.calc(current, previous, None))
        previous = current
        if on_batch is not None:
            on_batch(t + 1, pairs)

    def stack(flows: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).contiguous().to(frames.device)

    return stack(forward), stack(backward)
