"""FLATTEN trajectory building (FLATTEN §3.2): the vectorised builder against a per-cell Python reference.

    python bench/trajectories.py [--frames 32] [--grid 64] [--threads 1]

The reference chains cells one at a time in Python, as the official FLATTEN code and ComfyUI-FLATTEN do, with
this pack's rule (area-mean flow per cell, nearest landing cell, at most half occluded, seeded collision
priorities), so both give the same trajectories. Flow: a smooth synthetic field (zoom, swirl and waves, up to
~2 cells per frame, so cells collide) given at the grid's own resolution (chaining only) and at 8x it
(512x512 px for a 64x64 grid: area pooling included). Each (builder, resolution) runs in a fresh subprocess:
time is the best of several runs after a warm-up; peak memory is the rise of the peak resident size (VmHWM,
reset once the flow is built) over the resident size then. Both run with ``--threads`` torch threads (default
1: the reference is single-threaded Python, and on a small shared machine more threads mostly contend).
Target: the vectorised builder ≥ 100x faster.
"""
import argparse
import hashlib
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import _tve  # noqa: F401  (registers the pack as ``tve``)
import torch
import torch.nn.functional as F

from tve.flow.estimate import FlowField, occlusion_from_consistency
from tve.flow.trajectories import build_trajectory_grid

MiB = 1 << 20


def synthetic_flow(frames: int, height: int, width: int, cell: float) -> FlowField:
    """Smooth forward flow (zoom about the centre, a swirl and travelling waves), backward = −forward, occlusion
    by forward–backward consistency (flags where the field varies fast). ``cell``: px per grid cell."""
    t = torch.arange(frames - 1, dtype=torch.float32)[:, None, None]
    y = torch.linspace(-1, 1, height)[None, :, None]
    x = torch.linspace(-1, 1, width)[None, None, :]
    zoom = 0.6 * torch.sin(0.3 * t)
    dx = zoom * x - 0.8 * y + 0.5 * torch.sin(3 * y + 0.7 * t)
    dy = zoom * y + 0.8 * x + 0.5 * torch.cos(4 * x - 0.5 * t)
    forward = torch.stack([dx.expand(-1, height, width), dy.expand(-1, height, width)], 1) * cell   # px
    backward = -forward
    return FlowField(forward, backward, occlusion_from_consistency(forward, backward), "synthetic")


def per_cell_reference(flow: FlowField, grid_hw: tuple[int, int], seed: int = 0,
                       cut_occluded: bool = True) -> tuple[list[list[int]], list[list[int]]]:
    """The same chaining, cell by cell in Python (the peers' way); pooled with torch like their F.interpolate."""
    h, w = grid_hw
    frames, height, width = flow.frames, flow.height, flow.width
    mean = F.adaptive_avg_pool2d(flow.forward.float(), (h, w)).tolist()                  # [F-1][2][h][w] px
    occluded = F.adaptive_avg_pool2d(flow.occlusion.float()[:, None], (h, w))[:, 0].tolist()
    bits = max(1, (h * w - 1).bit_length())                                             # the builder's priorities
    generator = torch.Generator().manual_seed(seed)
    draw = torch.empty(frames - 1, h * w, dtype=torch.int32).random_(generator=generator).tolist()
    priority = [[d * (1 << bits) + cell for cell, d in enumerate(row)] for row in draw]
    track_of = [list(range(h * w))]
    born = h * w
    for t in range(frames - 1):
        claims: dict[int, tuple[int, int]] = {}                                          # target -> (priority, cell)
        for y in range(h):
            for x in range(w):
                tx = math.floor(x + mean[t][0][y][x] * w / width + 0.5)
                ty = math.floor(y + mean[t][1][y][x] * h / height + 0.5)
                if not (0 <= tx < w and 0 <= ty < h) or (cut_occluded and occluded[t][y][x] > 0.5):
                    continue
                cell, target = y * w + x, ty * w + tx
                if target not in claims or priority[t][cell] > claims[target][0]:
                    claims[target] = (priority[t][cell], cell)
        following = [-1] * (h * w)
        for target, (_, cell) in claims.items():
            following[target] = track_of[t][cell]
        for cell in range(h * w):
            if following[cell] < 0:
                following[cell] = born
                born += 1
        track_of.append(following)
    tracks = [[-1] * frames for _ in range(born)]
    for t in range(frames):
        for cell, trajectory in enumerate(track_of[t]):
            tracks[trajectory][t] = cell
    return tracks, track_of


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak() -> None:
    """Reset the kernel's peak resident size (Linux ``clear_refs`` 5), so building the flow is not counted."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_bytes() -> int:
    """Peak resident size since the last reset (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def measure(builder: str, frames: int, grid: int, scale: int, repeats: int, threads: int) -> dict:
    """In a fresh process: best seconds of ``repeats`` runs after a warm-up, peak memory rise, a result digest."""
    torch.set_num_threads(threads)
    flow = synthetic_flow(frames, grid * scale, grid * scale, cell=scale)
    if builder == "vectorised":
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            result = build_trajectory_grid(flow, (grid, grid))
            return result.tracks, result.track_of
    else:
        def run() -> tuple[list, list]:
            return per_cell_reference(flow, (grid, grid))
    baseline = _resident_bytes()
    _reset_peak()
    best, result = float("inf"), None
    for _ in range(repeats + 1):
        begin = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - begin)
    peak = _peak_bytes()
    tracks, track_of = (torch.as_tensor(part, dtype=torch.long) for part in result)
    digest = hashlib.sha1(tracks.numpy().tobytes() + track_of.numpy().tobytes()).hexdigest()
    return {"seconds": best, "peak_rise": peak - baseline, "trajectories": len(tracks), "digest": digest}


def measured(builder: str, frames: int, grid: int, scale: int, repeats: int, threads: int) -> dict:
    """``measure`` in a fresh subprocess, so its peak memory is its own."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", builder, str(frames),
                          str(grid), str(scale), str(repeats), str(threads)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--grid", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--measure", nargs=6, metavar=("BUILDER", "FRAMES", "GRID", "SCALE", "REPEATS", "THREADS"),
                    help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.measure:
        builder, *numbers = opts.measure
        print(json.dumps(measure(builder, *map(int, numbers))))
        return
    frames, grid, threads = opts.frames, opts.grid, opts.threads
    for scale in (1, 8):
        fast = measured("vectorised", frames, grid, scale, 30, threads)
        slow = measured("reference", frames, grid, scale, 3, threads)
        size = f"{grid * scale}x{grid * scale} px flow, {threads} torch thread{'s' * (threads > 1)}"
        print(f"vectorised/per-cell speed-up {slow['seconds'] / fast['seconds']:.0f}x ({frames} frames, {grid}x{grid} "
              f"grid, {size}): vectorised {fast['seconds'] * 1e3:.1f} ms, per-cell reference "
              f"{slow['seconds'] * 1e3:.0f} ms; {fast['trajectories']} trajectories, "
              f"identical: {fast['digest'] == slow['digest']}")
        print(f"per-cell/vectorised peak memory {slow['peak_rise'] / max(fast['peak_rise'], 1):.1f}x ({size}): "
              f"vectorised +{fast['peak_rise'] / MiB:.1f} MiB, per-cell reference +{slow['peak_rise'] / MiB:.1f} MiB "
              f"(peak resident size rise after the flow is built)")


if __name__ == "__main__":
    main()
