"""FLATTEN trajectory attention cost: grouped (this pack) against per-query key lists (the peers), ratios first.

    python bench/flatten.py [--frames 8 16 32]

One self-attention block at the 64×64 token grid (T=4096), C=320, 8 heads, 2 CFG chunks, fp32 on the CPU,
trajectories of a random smooth translation. Each (method, frames) runs in a fresh subprocess; its peak memory
is the rise of ru_maxrss over the resident size after the inputs are built. Per-query runs whose analytic K+V
lists exceed ``PER_QUERY_BUDGET`` are not run; their analytic size is printed instead.
Targets: grouped peak / dense output ≤ 2×; the per-query/grouped memory ratio grows ∝ F.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import _tve  # noqa: F401  (registers the pack as ``tve``)
import torch
import torch.nn.functional as F

from tve.attention.flatten import trajectory_attention, trajectory_index

GRID_HW, CHANNELS, HEADS, CHUNKS = (64, 64), 320, 8, 2
PER_QUERY_BUDGET = 8 << 30          # bytes of analytic per-query K+V lists run for real on a 24 GB machine
GB = 1 << 30


def translation_trajectories(frames: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """tracks (n_traj, F), track_of (F, h·w) of content moving by a random step in {-1, 0, 1}² cells per frame."""
    h, w = GRID_HW
    steps = torch.randint(-1, 2, (frames, 2), generator=torch.Generator().manual_seed(seed))
    offset = torch.cumsum(steps, 0) - steps[0]                                         # (F, 2), frame 0 at 0
    y, x = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    world = (y - offset[:, 0, None, None]) * 4 * w + (x - offset[:, 1, None, None])   # (F, h, w)
    track_of = world.reshape(frames, h * w).unique(return_inverse=True)[1]
    tracks = torch.full((int(track_of.max()) + 1, frames), -1, dtype=torch.long)
    tracks[track_of, torch.arange(frames)[:, None]] = torch.arange(h * w)
    return tracks, track_of


def per_query_attention(x: torch.Tensor, tracks: torch.Tensor, track_of: torch.Tensor) -> torch.Tensor:
    """The peers' way (official FLATTEN, ComfyUI-FLATTEN): a private F-long key and value list per query token."""
    chunk_frames, tokens, channels = x.shape
    frames = chunk_frames // CHUNKS
    present = tracks >= 0
    position = torch.arange(frames) * tokens + tracks.clamp(min=0)                      # (n, F)
    keys_of = position[track_of.reshape(-1)]                                             # (F·T, F) per query
    mask = present[track_of.reshape(-1)]                                                 # (F·T, F)
    flat = x.reshape(CHUNKS, frames * tokens, channels)
    k = flat[:, keys_of]                                                                 # (chunks, F·T, F, C)
    v = flat[:, keys_of]
    d = channels // HEADS
    q = flat.reshape(-1, 1, HEADS, d).transpose(1, 2)                                    # (chunks·F·T, heads, 1, d)
    k, v = (t.reshape(-1, frames, HEADS, d).transpose(1, 2) for t in (k, v))            # (.., heads, F, d)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(CHUNKS, 1)[:, None, None, :])
    return out.reshape(chunk_frames, tokens, channels)


def per_query_bytes(frames: int) -> int:
    """Analytic size of the per-query K and V lists: 2 · chunks · F·T · F · C fp32."""
    return 2 * CHUNKS * frames * GRID_HW[0] * GRID_HW[1] * frames * CHANNELS * 4


def dense_output_bytes(frames: int) -> int:
    return CHUNKS * frames * GRID_HW[0] * GRID_HW[1] * CHANNELS * 4


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(method: str, frames: int, repeats: int) -> dict:
    """Run in a fresh process: seconds (best of ``repeats`` after a warm-up) and peak memory rise in bytes."""
    torch.manual_seed(0)
    tracks, track_of = translation_trajectories(frames)
    trajectory_index(tracks, track_of)                                                  # warm-up
    start = time.perf_counter()
    index = trajectory_index(tracks, track_of)
    index_seconds = time.perf_counter() - start
    x = torch.randn(CHUNKS * frames, GRID_HW[0] * GRID_HW[1], CHANNELS)
    if method == "grouped":
        def run() -> torch.Tensor:
            return trajectory_attention(x, x, x, index, HEADS, CHUNKS)
    else:
        def run() -> torch.Tensor:
            return per_query_attention(x, tracks, track_of)
    baseline = _resident_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    best = float("inf")
    for _ in range(repeats + 1):
        begin = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - begin)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": best, "peak_rise": peak - baseline, "setup_peak_rise": peak_before - baseline,
            "index_seconds": index_seconds, "trajectories": len(tracks)}


def measured(method: str, frames: int, repeats: int, cache: dict) -> dict:
    """``measure`` in a fresh subprocess (so ru_maxrss is this configuration's alone), cached per run."""
    key = (method, frames)
    if key not in cache:
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", method, str(frames),
                              str(repeats)], check=True, capture_output=True, text=True).stdout
        cache[key] = json.loads(out.strip().splitlines()[-1])
    return cache[key]


def figure_grouped_vs_per_query(frame_counts: list[int], cache: dict) -> None:
    """Per-query / grouped time and peak memory per frame count; analytic where per-query does not fit."""
    memory_ratios = []
    for frames in frame_counts:
        grouped = measured("grouped", frames, 3, cache)
        if per_query_bytes(frames) > PER_QUERY_BUDGET:
            ratio = per_query_bytes(frames) / grouped["peak_rise"]
            memory_ratios.append((frames, ratio))
            print(f"per-query/grouped memory ≥ {ratio:.1f}x (ANALYTIC, not run: K+V lists alone "
                  f"{per_query_bytes(frames) / GB:.1f} GB > {PER_QUERY_BUDGET / GB:.0f} GB budget) at F={frames}: "
                  f"grouped {grouped['peak_rise'] / GB:.2f} GB, {grouped['seconds']:.2f} s")
            continue
        per_query = measured("per_query", frames, 1, cache)
        ratio = per_query["peak_rise"] / grouped["peak_rise"]
        memory_ratios.append((frames, ratio))
        print(f"per-query/grouped time {per_query['seconds'] / grouped['seconds']:.1f}x, memory {ratio:.1f}x "
              f"(measured) at F={frames}: grouped {grouped['seconds']:.2f} s {grouped['peak_rise'] / GB:.2f} GB, "
              f"per-query {per_query['seconds']:.2f} s {per_query['peak_rise'] / GB:.2f} GB "
              f"(analytic K+V {per_query_bytes(frames) / GB:.2f} GB)")
    for (f0, r0), (f1, r1) in zip(memory_ratios, memory_ratios[1:]):
        print(f"memory ratio growth {r1 / r0:.2f}x from F={f0} to F={f1} (frames x{f1 / f0:.0f}; "
              f"per-query/grouped {r0:.1f}x -> {r1:.1f}x)")


def figure_grouped_memory_vs_output(frame_counts: list[int], cache: dict) -> None:
    """Grouped peak memory rise over the dense output's size (target ≤ 2×), and the index build time."""
    for frames in frame_counts:
        grouped = measured("grouped", frames, 3, cache)
        print(f"grouped peak / dense output {grouped['peak_rise'] / dense_output_bytes(frames):.2f}x at F={frames} "
              f"({grouped['peak_rise'] / GB:.2f} GB / {dense_output_bytes(frames) / GB:.2f} GB; "
              f"{grouped['trajectories']} trajectories, index built once in {grouped['index_seconds']:.2f} s)")


def figure_edit_vs_cfg(frames: int = 16, size: int = 32, steps: int = 4) -> None:
    """FLATTEN edit (dense attention everywhere + trajectories at the top grid) / plain CFG sampling, real host."""
    if not os.environ.get("COMFYUI_PATH"):
        print("skipped: FLATTEN edit / plain CFG needs the real host (set COMFYUI_PATH)")
        return
    _tve.real_host()
    from _edits import best_of, cfg_edit, inverted_video
    from tve.flow.estimate import FlowField
    from tve.flow.trajectories import build_trajectories
    from tve.nodes.flatten import apply_flatten
    from tve.tools.video_world import render_clip
    clip = render_clip(frames, size * 8, size * 8, seed=0, sprites=2)
    flow = FlowField(clip.flow_forward, clip.flow_backward, clip.occlusion_forward, "ground truth")
    model, x_T, inversion = inverted_video(frames, size, steps)
    patched = apply_flatten(model, build_trajectories(flow, (size, size)), "highest resolution", "dense_output")
    t_plain = best_of(lambda: cfg_edit(model, x_T, inversion.sigmas))
    t_flatten = best_of(lambda: cfg_edit(patched, x_T, inversion.sigmas))
    print(f"{t_flatten / t_plain:.2f}x FLATTEN edit / plain CFG sampling (target <= 2x): {t_flatten:.2f} s vs "
          f"{t_plain:.2f} s, {frames} frames, {size}x{size} latent, {steps} steps, tiny SD1.5-shaped UNet, CPU")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--measure", nargs=3, metavar=("METHOD", "FRAMES", "REPEATS"), help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.measure:
        method, frames, repeats = opts.measure
        print(json.dumps(measure(method, int(frames), int(repeats))))
        return
    cache: dict = {}
    figure_grouped_vs_per_query(opts.frames, cache)
    figure_grouped_memory_vs_output(opts.frames, cache)
    figure_edit_vs_cfg()


if __name__ == "__main__":
    main()
