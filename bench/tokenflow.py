"""TokenFlow cost on the real host, in one run (ratios first).

    COMFYUI_PATH=/path/to/ComfyUI python bench/tokenflow.py

1. TokenFlow edit time / plain CFG sampling time, same frames and steps (issue 5 target ≤ 1.3×; the reference
   implementation runs a 3-way batch, ≈ 1.5×). Also the per-frame PnP edit (injection only) for scale.
2. Peak memory of a TokenFlow edit for 16, 32, 64 and 128 frames, each in a fresh process (the resident-set rise during
   a second, warm edit, sampled from /proc): growth must be linear in frames.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import _tve

_tve.real_host()

from _edits import best_of, cfg_edit, inverted_video, peak_rss_rise  # noqa: E402

from tve.engine.injection import apply_feature_injection
from tve.engine.tokenflow import apply_tokenflow


def measure_memory(frames: int, size: int, steps: int) -> dict:
    model, x_T, inversion = inverted_video(frames, size, steps)
    patched = apply_tokenflow(model, inversion, 8, 0, "paper", 0.5, 0.8)
    cfg_edit(patched, x_T, inversion.sigmas)                      # warm: model loaded, buffers allocated once
    return {"frames": frames, "rise": peak_rss_rise(lambda: cfg_edit(patched, x_T, inversion.sigmas))}


def figure_time(frames: int, size: int, steps: int) -> None:
    model, x_T, inversion = inverted_video(frames, size, steps)
    tokenflow = apply_tokenflow(model, inversion, 8, 0, "paper", 0.5, 0.8)
    injection = apply_feature_injection(model, inversion, 0.5, 0.8, "tokenflow", "sigma-matched")
    t_plain = best_of(lambda: cfg_edit(model, x_T, inversion.sigmas))
    t_tokenflow = best_of(lambda: cfg_edit(tokenflow, x_T, inversion.sigmas))
    t_pnp = best_of(lambda: cfg_edit(injection, x_T, inversion.sigmas))
    shape = f"{frames} frames, {size}x{size} latent, {steps} steps, interval 8, tiny SD1.5-shaped UNet, CPU"
    print(f"{t_tokenflow / t_plain:.2f}x TokenFlow edit / plain CFG sampling (target <= 1.3x): "
          f"{t_tokenflow:.2f} s vs {t_plain:.2f} s; {shape}", flush=True)
    print(f"{t_pnp / t_plain:.2f}x per-frame PnP edit / plain CFG sampling: {t_pnp:.2f} s", flush=True)


def figure_memory(frame_counts: list[int], size: int, steps: int) -> None:
    rows = []
    for frames in frame_counts:
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", str(frames), str(size),
                              str(steps)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    for previous, row in zip(rows, rows[1:]):
        print(f"{row['rise'] / previous['rise']:.2f}x TokenFlow peak memory rise from {previous['frames']} to "
              f"{row['frames']} frames ({row['frames'] / previous['frames']:.0f}x frames; linear = same ratio): "
              f"{previous['rise'] / 2**20:.0f} MiB -> {row['rise'] / 2**20:.0f} MiB at {size}x{size}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--memory-frames", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--memory-size", type=int, default=16)
    ap.add_argument("--measure", nargs=3, type=int, help=argparse.SUPPRESS)
    opts = ap.parse_args()
    if opts.measure:
        print(json.dumps(measure_memory(*opts.measure)))
        return
    figure_time(opts.frames, opts.size, opts.steps)
    figure_memory(opts.memory_frames, opts.memory_size, 2)


if __name__ == "__main__":
    main()
