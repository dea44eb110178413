"""Forward and backward optical flow between consecutive frames, and occlusion by forward–backward consistency.

RAFT (Teed & Deng, ECCV 2020) is torchvision's architecture with a state dict the caller loads; its inputs are
[-1, 1] (torchvision's transforms), padded to a multiple of 8 and at least 128 px (the correlation pyramid's
minimum), and the last refinement iteration is kept. DIS (Kroeger et al., ECCV 2016) is OpenCV's, tuned for
sub-pixel accuracy. Occlusion: the forward–backward consistency check of Sundaram, Brox & Keutzer, ECCV 2010.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.optical_flow import raft_large, raft_small

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

    def __post_init__(self) -> None:
        if self.forward.ndim != 4 or self.forward.shape[1] != 2:
            raise ValueError(f"flow: expected forward flow (F-1, 2, H, W), got shape {tuple(self.forward.shape)}")
        pairs, _, h, w = self.forward.shape
        if pairs < 1:
            raise ValueError("flow: expected at least one frame pair, got none")
        if self.backward.shape != self.forward.shape or self.occlusion.shape != (pairs, h, w):
            raise ValueError(f"flow: expected backward flow {tuple(self.forward.shape)} and occlusion "
                             f"{(pairs, h, w)}, got {tuple(self.backward.shape)} and {tuple(self.occlusion.shape)}")

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


def _looks_like(state: Mapping[str, torch.Tensor]) -> str:
    """Which torchvision RAFT variant a state dict fits, for error messages."""
    for name, constructor in RAFT_VARIANTS.items():
        reference = constructor(weights=None, progress=False).state_dict()
        if set(reference) == set(state) and all(reference[k].shape == state[k].shape for k in reference):
            return f"a {name} checkpoint: choose method '{name}'"
    return "another model, not a torchvision RAFT checkpoint"


def estimate_flow(frames: torch.Tensor, method: str, raft: torch.nn.Module | None = None, batch_size: int = 8,
                  on_batch: Callable[[int, int], None] | None = None) -> FlowField:
    """Forward and backward flow of every consecutive pair of ``frames`` (F, H, W, 3) in [0, 1].

    method: "raft_large" | "raft_small" (``raft`` from :func:`build_raft`, run on its device and dtype) or
    "dis" (OpenCV, CPU). ``batch_size`` RAFT pairs per call; forward and backward pairs share the batches.
    ``on_batch(done, total)`` is called after each batch with the number of flows done out of 2·(F-1).
    The result is float32 on the frames' device.
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
    if method == "dis":
        forward, backward = _dis_flows(frames, on_batch)
    else:
        if raft is None:
            raise ValueError(f"raft: method '{method}' needs a RAFT module from build_raft, got None")
        forward, backward = _raft_flows(frames, raft, batch_size, on_batch)
    return FlowField(forward=forward, backward=backward, occlusion=occlusion_from_consistency(forward, backward),
                     method=method)


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


def _raft_flows(frames: torch.Tensor, raft: torch.nn.Module, batch_size: int,
                on_batch: Callable[[int, int], None] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(F-1, 2, H, W) forward and backward float32 flows from RAFT, batched over the 2·(F-1) pairs."""
    parameter = next(raft.parameters())
    device, dtype = parameter.device, parameter.dtype
    count, height, width, _ = frames.shape
    pairs = count - 1
    first = torch.cat([torch.arange(pairs), torch.arange(1, count)])          # (2·pairs,) forward then backward
    second = torch.cat([torch.arange(1, count), torch.arange(pairs)])
    pad_h, pad_w = _raft_padding(height), _raft_padding(width)
    padding = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)    # left, right, top, bottom
    low_precision = dtype in (torch.float16, torch.bfloat16)                # torchvision RAFT needs autocast there

    def prepare(index: torch.Tensor) -> torch.Tensor:
        x = frames[index].to(device, dtype).permute(0, 3, 1, 2).contiguous()    # (B, 3, H, W), NCHW in memory
        return F.pad(x * 2 - 1, padding, mode="replicate")                      # [-1, 1], (B, 3, H', W')

    flows = []
    with torch.no_grad():
        for start in range(0, 2 * pairs, batch_size):
            batch = slice(start, start + batch_size)
            image1, image2 = prepare(first[batch]), prepare(second[batch])
            with torch.autocast(device.type, dtype=dtype, enabled=low_precision):
                flow = raft(image1, image2)[-1]                              # last refinement, (B, 2, H', W')
            flow = flow[:, :, padding[2]:padding[2] + height, padding[0]:padding[0] + width]
            flows.append(flow.float().to(frames.device))
            if on_batch is not None:
                on_batch(min(start + batch_size, 2 * pairs), 2 * pairs)
    flows = torch.cat(flows)
    return flows[:pairs], flows[pairs:]


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


def _dis_flows(frames: torch.Tensor, on_batch: Callable[[int, int], None] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(F-1, 2, H, W) forward and backward float32 flows from OpenCV DIS on uint8 grayscale frames."""
    cv2 = opencv()
    rgb = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()   # (F, H, W, 3)
    gray = [cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) for image in rgb]
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    dis.setFinestScale(DIS_FINEST_SCALE)
    dis.setPatchStride(DIS_PATCH_STRIDE)
    dis.setVariationalRefinementIterations(DIS_REFINEMENT_ITERATIONS)
    dis.setVariationalRefinementAlpha(DIS_REFINEMENT_ALPHA)
    pairs = len(gray) - 1
    forward, backward = [], []
    for t in range(pairs):
        forward.append(dis.calc(gray[t], gray[t + 1], None))                # (H, W, 2) float32
        backward.append(dis.calc(gray[t + 1], gray[t], None))
        if on_batch is not None:
            on_batch(2 * (t + 1), 2 * pairs)

    def stack(flows: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2).contiguous().to(frames.device)

    return stack(forward), stack(backward)
