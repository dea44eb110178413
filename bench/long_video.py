"""Long videos in bounded memory on the pack's frame windows (TVE_FrameWindows), on the real host, ratios first.

    COMFYUI_PATH=/path/to/ComfyUI python bench/long_video.py [--frames 16 64 240] [--size 32] [--methods ...]
        [--runs 3] [--threads 1] [--seam-frames 48] [--no-seams]

Cost: per method (per-frame PnP, TokenFlow, FLATTEN, TokenFlow + FLATTEN) and frame count, each in a fresh
process, a 32×32 latent of random values and the tiny SD1.5-shaped UNet of the tests (the model's weights do not
change what is computed or held), 2 steps, default windows (16 frames, overlap 4), FLATTEN trajectories of a steady
translation: the DDIM inversion (windowed, per frame), then the edit, whose peak resident-memory rise (sampled from
/proc) and wall time per frame are measured. Issue 14 targets: peak memory at 240 frames ≤ 1.3× that at 64, beyond the
video-sized latents (the sampler's x, its outputs and the stored source latents: small and linear in frames,
subtracted as ``LATENT_COPIES`` latents of the video plus the inversion's latents); TokenFlow time per frame at 240
≤ 1.2× that at 16. The table is measured ``--runs`` times (each run: every frame count, the methods alternating
order), and every run's ratios are printed, then their median and range: a single run's resident-set peak moves
with the allocator and the load.

Seams: the trained test model edits a held-out procedural clip of ``--seam-frames`` frames (16×16 latent, windows
of 16 overlapping by 4) with FLATTEN and with TokenFlow; the latent warp error of each consecutive pair under the
ground-truth flow (frame t+1 backward-warped into frame t's cells, squared error over channels, mean over the cells
no occluded pixel touches) is averaged over the pairs that cross a window boundary (a window starts or ends
between them) and over the pairs inside windows. Target: boundary / inside ≤ 1.2×.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import statistics

import _timing
import _tve

_tve.real_host()

import torch  # noqa: E402
from _edits import peak_rss_rise  # noqa: E402

from tve.engine.frame_windows import batches, overlapping_windows
from tve.flow.estimate import FlowField  # noqa: E402
from tve.flow.trajectories import build_trajectories  # noqa: E402
from tve.engine.flatten import apply_flatten
from tve.engine.injection import apply_feature_injection
from tve.engine.inversion import invert
from tve.engine.tokenflow import apply_tokenflow
from tve.tools.edit_measures import latent_flow, pair_warp_errors  # noqa: E402

METHODS = ["per-frame PnP", "TokenFlow", "FLATTEN", "TokenFlow+FLATTEN"]
LATENT_COPIES = 8     # video-sized latents alive during an edit: x, denoised, cond/uncond outputs, sampler state
WINDOW, OVERLAP = 16, 4


def translation_flow(frames: int, hw: tuple[int, int], step=(2.0, 1.0)) -> FlowField:
    """Flow of a steady translation by ``step`` px per frame, nothing occluded (FLATTEN's trajectories need one)."""
    forward = torch.tensor(step).view(1, 2, 1, 1).expand(frames - 1, 2, *hw).contiguous()
    return FlowField(forward, -forward, torch.zeros(frames - 1, *hw, dtype=torch.bool), "translation")


def patched(method: str, model, inversion, trajectories, seed: int = 0, interval: int = 8):
    """The edit model of ``method`` (FLATTEN methods: ``model`` already has FLATTEN, it inverted with it)."""
    if method in ("per-frame PnP", "FLATTEN"):
        preset = "flatten" if method == "FLATTEN" else "tokenflow"
        return apply_feature_injection(model, inversion, 0.5, 0.8, preset, "sigma-matched")
    return apply_tokenflow(model, inversion, interval, seed, "paper", 0.5, 0.8)


def sample(model, x_T, sigmas, positive, negative, cfg: float, seed: int = 0) -> torch.Tensor:
    import comfy.sample
    import comfy.samplers
    return comfy.sample.sample_custom(model, torch.zeros_like(x_T), cfg, comfy.samplers.sampler_object("euler"),
                                      sigmas, positive, negative, x_T, disable_pbar=True, seed=seed)


# ---------------------------------------------------------------------------------------------- cost
def measure(method: str, frames: int, size: int, steps: int) -> dict:
    from tve.tests.hosts import make_conditioning, make_tiny_model
    model = make_tiny_model("sd15")
    latent = torch.randn(frames, 4, size, size, generator=torch.Generator().manual_seed(0))
    x_T, inversion = invert(model, latent, make_conditioning("sd15", 1), steps, "ddim_uniform")
    trajectories = None
    if "FLATTEN" in method:                 # the edit is measured: the inversion need not run FLATTEN here
        trajectories = build_trajectories(translation_flow(frames, (8 * size, 8 * size)), (size, size))
        model = apply_flatten(model, trajectories, "highest resolution", "dense_output")
    edit_model = patched(method, model, inversion, trajectories)
    seconds = []

    def run():
        start = time.perf_counter()
        sample(edit_model, x_T, inversion.sigmas, make_conditioning("sd15", 2), make_conditioning("sd15", 3), 7.5)
        seconds.append(time.perf_counter() - start)

    rise = peak_rss_rise(run)
    latents = LATENT_COPIES * x_T.numel() * x_T.element_size() + \
        inversion.latents.numel() * inversion.latents.element_size()
    return {"rise": rise, "latents": latents, "seconds": seconds[0]}


def cost_table(methods: list[str], frame_counts: list[int], size: int, steps: int, threads: int = 1) -> dict:
    rows = {}
    for i, frames in enumerate(frame_counts):
        for method in (methods if i % 2 == 0 else methods[::-1]):
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--measure", method, str(frames),
                                  str(size), str(steps), "--threads", str(threads)], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{method} at {frames} frames failed:\n{out.stderr[-3000:]}")
            rows[method, frames] = json.loads(out.stdout.strip().splitlines()[-1])
            r = rows[method, frames]
            print(f"  {method} at {frames} frames: edit {r['seconds']:.1f} s ({1000 * r['seconds'] / frames:.0f} "
                  f"ms/frame), peak rise {r['rise'] / 2**20:.0f} MiB, video latents {r['latents'] / 2**20:.1f} MiB",
                  flush=True)
    return rows


def ratios(rows: dict, method: str, frame_counts: list[int]) -> tuple[float, float, dict, dict]:
    """(memory ratio long/mid beyond the latents, time-per-frame ratio long/short, beyond, per_frame) of a run."""
    short, mid, long = frame_counts
    beyond = {f: rows[method, f]["rise"] - rows[method, f]["latents"] for f in frame_counts}
    per_frame = {f: rows[method, f]["seconds"] / f for f in frame_counts}
    return beyond[long] / beyond[mid], per_frame[long] / per_frame[short], beyond, per_frame


# ---------------------------------------------------------------------------------------------- seams
def boundary_pairs(frames: int, schedule: list[list[int]]) -> set[int]:
    """Pairs (t, t+1), as t, that a window starts or ends between."""
    cuts = {w[0] for w in schedule if w[0] > 0} | {w[-1] + 1 for w in schedule if w[-1] + 1 < frames}
    return {c - 1 for c in cuts}


def seams(frames: int, steps: int, cfg: float) -> dict:
    from tve.tests.trained_model import load_trained_model, trained_conditioning
    from tve.tools.train_test_model import HELD_OUT_SEED
    from tve.tools.video_world import frames_to_latent, render_clip
    clip = render_clip(frames, 128, 128, seed=HELD_OUT_SEED, sprites=2)
    flow = FlowField(clip.flow_forward, clip.flow_backward, clip.occlusion_forward, "ground truth")
    raw = frames_to_latent(clip.frames)
    hw = tuple(raw.shape[-2:])
    base = load_trained_model()
    results = {}
    for method, schedule in (("FLATTEN", overlapping_windows(frames, WINDOW, OVERLAP)),
                             ("TokenFlow", batches(frames, WINDOW))):
        model = base
        trajectories = None
        if method == "FLATTEN":
            trajectories = build_trajectories(flow, hw)
            model = apply_flatten(base, trajectories, "highest resolution", "dense_output")
        x_T, inversion = invert(model, raw, trained_conditioning("source"), steps, "ddim_uniform")
        out = sample(patched(method, model, inversion, trajectories), x_T, inversion.sigmas,
                     trained_conditioning("target"), trained_conditioning("empty"), cfg)
        errors = pair_warp_errors(out, *latent_flow(flow.forward, flow.occlusion))
        cut = boundary_pairs(frames, schedule)
        inside = [e for t, e in enumerate(errors.tolist()) if t not in cut]
        across = [errors[t].item() for t in sorted(cut)]
        results[method] = {"across": sum(across) / len(across), "inside": sum(inside) / len(inside),
                           "pairs": sorted(cut)}
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs=3, default=[16, 64, 240])
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    ap.add_argument("--runs", type=int, default=3, help="times the cost table is measured")
    ap.add_argument("--no-seams", action="store_true", help="the cost table only")
    ap.add_argument("--seam-frames", type=int, default=48)
    ap.add_argument("--seam-steps", type=int, default=6)
    ap.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    _timing.add_arguments(ap, repeats=1, backends=())
    opts = ap.parse_args()
    _timing.pin_threads(opts.threads)
    if opts.measure:
        method, frames, size, steps = opts.measure
        with torch.inference_mode():                                # as ComfyUI runs its nodes
            print(json.dumps(measure(method, int(frames), int(size), int(steps))))
        return
    short, mid, long = opts.frames
    _timing.header(f"{opts.size}x{opts.size} latent, {opts.steps} steps, windows of {WINDOW} overlapping by "
                   f"{OVERLAP}, TokenFlow interval 8, tiny SD1.5-shaped UNet, CPU, {opts.runs} runs")
    per_run = {method: [] for method in opts.methods}
    for run in range(opts.runs):
        print(f"## run {run + 1} of {opts.runs}", flush=True)
        rows = cost_table(opts.methods, opts.frames, opts.size, opts.steps, opts.threads)
        for method in opts.methods:
            memory, time_, beyond, per_frame = ratios(rows, method, opts.frames)
            per_run[method].append((memory, time_))
            print(f"{memory:.2f}x {method} peak memory at {long} / {mid} frames beyond the video's latents (target "
                  f"<= 1.3x): {beyond[mid] / 2**20:.0f} -> {beyond[long] / 2**20:.0f} MiB; {time_:.2f}x time per "
                  f"frame at {long} / {short} frames{' (target <= 1.2x)' if method == 'TokenFlow' else ''}: "
                  f"{1000 * per_frame[short]:.0f} -> {1000 * per_frame[long]:.0f} ms [run {run + 1}]", flush=True)
    if opts.runs > 1:
        for method, values in per_run.items():
            memory, time_ = ([v[i] for v in values] for i in (0, 1))
            print(f"{statistics.median(memory):.2f}x {method} peak memory {long} / {mid} frames, median of "
                  f"{opts.runs} runs (range {min(memory):.2f}-{max(memory):.2f}x); time per frame {long} / {short} "
                  f"median {statistics.median(time_):.2f}x (range {min(time_):.2f}-{max(time_):.2f}x)", flush=True)
    if opts.no_seams:
        return
    with torch.inference_mode():
        for method, r in seams(opts.seam_frames, opts.seam_steps, 5.0).items():
            print(f"{r['across'] / r['inside']:.2f}x {method} latent warp error across window boundaries / inside "
                  f"windows (target <= 1.2x): {r['across']:.4f} / {r['inside']:.4f}, {opts.seam_frames} frames, "
                  f"boundary pairs {r['pairs']}, trained test model, {opts.seam_steps} steps", flush=True)


if __name__ == "__main__":
    main()
