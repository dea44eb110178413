"""TokenFlow cost on the real host, in one run (ratios first).

    COMFYUI_PATH=/path/to/ComfyUI python bench/tokenflow.py [--threads 1] [--repeats 3] [--backends sub_quad pytorch]

1. TokenFlow edit time / plain CFG sampling time, same frames and steps (issue 5 target ≤ 1.3×; the reference
   implementation runs a 3-way batch, ≈ 1.5×), and the per-frame PnP edit (injection only) for scale: the three
   interleaved (``_timing``: best and median of ``--repeats`` rounds, one torch thread by default), once for each
   of the host's attention backends (sub-quadratic, ComfyUI's CPU default, and torch SDPA, its GPU default).
2. Peak memory of a TokenFlow edit for 16, 32, 64 and 128 frames, each in a fresh process (the resident-set rise during
   a second, warm edit, sampled from /proc): growth must be linear in frames.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import _timing
import _tve

_tve.real_host()

from _edits import cfg_edit, inverted_video, peak_rss_rise  # noqa: E402

from tve.engine.injection import apply_feature_injection
from tve.engine.tokenflow import apply_tokenflow


def measure_memory(frames: int, size: int, steps: int) -> dict:
    model, x_T, inversion = inverted_video(frames, size, steps)
    patched = apply_tokenflow(model, inversion, 8, 0, "paper", 0.5, 0.8)
    cfg_edit(patched, x_T, inversion.sigmas)                      # warm: model loaded, buffers allocated once
    return {"frames": frames, "rise": peak_rss_rise(lambda: cfg_edit(patched, x_T, inversion.sigmas))}


def figure_time(frames: int, size: int, steps: int, repeats: int, backends: list[str]) -> None:
    model, x_T, inversion = inverted_video(frames, size, steps)
    shape = f"{frames} frames, {size}x{size} latent, {steps} steps, interval 8, tiny SD1.5-shaped UNet, CPU"
    _timing.header(f"TokenFlow and per-frame PnP edit vs plain CFG sampling, {shape}")
    for backend in backends:
        plain = _timing.with_attention(model, backend)
        tokenflow = apply_tokenflow(plain, inversion, 8, 0, "paper", 0.5, 0.8)
        injection = apply_feature_injection(plain, inversion, 0.5, 0.8, "tokenflow", "sigma-matched")
        times = _timing.interleaved({name: (lambda m=m: cfg_edit(m, x_T, inversion.sigmas)) for name, m in
                                     (("plain", plain), ("tokenflow", tokenflow), ("pnp", injection))}, repeats)
        label = _timing.backend_label(backend)
        print(_timing.ratio_line(times, "tokenflow", "plain",
                                 f"TokenFlow edit / plain CFG sampling (target <= 1.3x) [{label}]"))
        print(_timing.ratio_line(times, "pnp", "plain", f"per-frame PnP edit / plain CFG sampling [{label}]"),
              flush=True)


def figure_memory(frame_counts: list[int], size: int, steps: int, threads: int = 1) -> None:
    rows = []
    for frames in frame_counts:
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", str(frames), str(size),
                              str(steps), "--threads", str(threads)], capture_output=True, text=True, check=True)
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
    ap.add_argument("--no-memory", action="store_true", help="the time figure only")
    ap.add_argument("--measure", nargs=3, type=int, help=argparse.SUPPRESS)
    _timing.add_arguments(ap)
    opts = ap.parse_args()
    _timing.pin_threads(opts.threads)
    if opts.measure:
        print(json.dumps(measure_memory(*opts.measure)))
        return
    figure_time(opts.frames, opts.size, opts.steps, opts.repeats, opts.backends)
    if not opts.no_memory:
        figure_memory(opts.memory_frames, opts.memory_size, 2, opts.threads)


if __name__ == "__main__":
    main()
