"""Cross-frame attention modes against vanilla per-frame attention: time and peak memory (one run, ratios first).

    python bench/cross_frame.py [--frames 8 16 32]

Setup: a 32×32 token grid (T = 1024), C = 320, 8 heads, 2 CFG chunks, fp32 on the CPU; keyframe interval 8, anchor
frame 0 (with and without its own keys), fine-coarse factor 2. Every (mode, frames) runs in a fresh process forked
from this one (which has only imported torch, so no thread pool or allocator state is inherited): a warm-up on tiny
inputs, then the inputs, then the timed call. The modes are interleaved: ``--repeats`` rounds over vanilla and
every mode (forward, then backward), one torch thread by default; times are best (median) of the rounds. Peak
memory is the call's rise of ``ru_maxrss`` over the level after the inputs were allocated (the median of the
rounds): output, gathers and attention temporaries, not q, k, v. Attention: torch SDPA (the pack's own).
"""
import argparse
import os
import pickle
import resource
import sys
import time

import statistics

import _timing
import _tve  # noqa: F401  (registers the pack as ``tve``)
import torch

from tve.attention.cross_frame import anchor_attention, dense_attention, fine_coarse_attention, keyframe_attention
from tve.attention.tokenflow import pick_keyframes
from tve.attention.frames import sdpa_attention

GRID, CHANNELS, HEADS, CHUNKS, INTERVAL, FACTOR = (32, 32), 320, 8, 2, 8, 2
MODES = ["keyframes", "dense", "anchor", "anchor+self", "fine_coarse"]
MIB = 1 << 20


def run(mode: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    frames = q.shape[0] // CHUNKS
    if mode == "vanilla":
        return sdpa_attention(q, k, v, HEADS)
    if mode == "keyframes":
        return keyframe_attention(q, k, v, HEADS, CHUNKS, pick_keyframes(range(frames), INTERVAL, 0, 0))
    if mode == "dense":
        return dense_attention(q, k, v, HEADS, CHUNKS)
    if mode in ("anchor", "anchor+self"):
        return anchor_attention(q, k, v, HEADS, CHUNKS, 0, mode == "anchor+self")
    return fine_coarse_attention(q, k, v, HEADS, CHUNKS, grid, FACTOR)


def inputs(frames: int, grid: tuple[int, int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(CHUNKS * frames, grid[0] * grid[1], CHANNELS, generator=g) for _ in range(3)]


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure(mode: str, frames: int) -> tuple[float, int]:
    """(seconds, peak bytes above the inputs) of one call, in a fresh forked process."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            run(mode, *inputs(2, (4, 4)), (4, 4))                                   # warm-up
            q, k, v = inputs(frames, GRID)
            before = peak_bytes()
            start = time.perf_counter()
            run(mode, q, k, v, GRID)
            result = (time.perf_counter() - start, peak_bytes() - before)
            os.write(write, pickle.dumps(result))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"the {mode} F={frames} measurement failed")
    return pickle.loads(data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    _timing.add_arguments(ap, repeats=3, backends=())
    opts = ap.parse_args()
    _timing.pin_threads(opts.threads)
    tokens = GRID[0] * GRID[1]
    _timing.header(f"cross-frame attention modes vs per-frame attention, T={tokens} ({GRID[0]}x{GRID[1]}), "
                   f"C={CHANNELS}, heads={HEADS}, chunks={CHUNKS}, fp32, CPU, keyframe interval {INTERVAL}, "
                   f"fine_coarse factor {FACTOR}")
    peaks: dict[tuple[str, int], int] = {}
    for frames in opts.frames:
        names = ["vanilla", *MODES]
        runs: dict[str, list] = {name: [] for name in names}
        for r in range(opts.repeats):
            for mode in (names if r % 2 == 0 else names[::-1]):
                runs[mode].append(measure(mode, frames))
        for mode in names:
            peaks[(mode, frames)] = int(statistics.median(p for _, p in runs[mode]))
        times = {mode: _timing.Times([t for t, _ in runs[mode]]) for mode in names}
        base_peak = peaks[("vanilla", frames)]
        for mode in MODES:
            p = peaks[(mode, frames)]
            print(f"{_timing.ratio(times, mode, 'vanilla')} {mode}/vanilla time  F={frames}  {mode} {times[mode]}  "
                  f"vanilla {times['vanilla']}", flush=True)
            print(f"{mode}/vanilla peak memory {p / base_peak:.2f}x  F={frames}  {mode} {p / MIB:.0f} MiB  "
                  f"vanilla {base_peak / MIB:.0f} MiB  (output alone {CHUNKS * frames * tokens * CHANNELS * 4 / MIB:.0f}"
                  f" MiB)", flush=True)
    for mode in ["dense", "fine_coarse"]:
        for small, large in zip(opts.frames, opts.frames[1:]):
            growth = peaks[(mode, large)] / peaks[(mode, small)]
            print(f"{mode} peak memory growth {growth:.2f}x  F={small}->{large} (frames x{large / small:.0f}; "
                  f"linear x{large / small:.0f}, quadratic x{(large / small) ** 2:.0f})  "
                  f"{peaks[(mode, small)] / MIB:.0f} -> {peaks[(mode, large)] / MIB:.0f} MiB")


if __name__ == "__main__":
    main()
