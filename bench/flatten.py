"""FLATTEN cost: grouped trajectory attention against per-query key lists (the peers), one block's dense and
trajectory attention against per-frame attention, the FLATTEN edit against plain CFG, and FLATTEN with the source's
features stored by the inversion against a live source pass; ratios first.

    python bench/flatten.py [--frames 8 16 32] [--figures per-query memory block trajectory edit stored]
        [--threads 1] [--repeats 3] [--backends sub_quad pytorch] [--baseline main]
    # COMFYUI_PATH set: the host's attention backends too, and the edit figure (real host)

Grouped vs per-query: one self-attention block at the 64×64 token grid (T=4096), C=320, 8 heads, 2 CFG chunks,
fp32 on the CPU, trajectories of a random smooth translation. Each (method, frames) runs in a fresh subprocess; its
peak memory is the rise of ru_maxrss over the resident size after the inputs are built. Per-query runs whose
analytic K+V lists exceed ``PER_QUERY_BUDGET`` are not run; their analytic size is printed instead.
Targets: grouped peak / dense output ≤ 2×; the per-query/grouped memory ratio grows ∝ F.

Block cost (``figure_block_cost``), trajectory attention now against a git revision's, by torch SDPA and by the
host's attention backends (``figure_trajectory_backends``), and the edit with its profile per host backend
(``figure_edit_vs_cfg``, the trained test model at ``bench/consistency.py``'s size), and stored vs live source
features with their memory (``figure_stored_features``): see their docstrings. Timings
on a shared CPU are noisy: one torch thread by default, every ratio from one interleaved run (``_timing``), best and
median printed, with the load average in the header.
"""
import argparse
import functools
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import _timing
import _tve  # noqa: F401  (registers the pack as ``tve``)
import torch
import torch.nn.functional as F

from tve.attention.flatten import trajectory_attention, trajectory_index

GRID_HW, CHANNELS, HEADS, CHUNKS = (64, 64), 320, 8, 2
PER_QUERY_BUDGET = 8 << 30          # bytes of analytic per-query K+V lists run for real on a 24 GB machine
GB = 1 << 30


def translation_trajectories(frames: int, seed: int = 0, grid_hw: tuple[int, int] = GRID_HW
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """tracks (n_traj, F), track_of (F, h·w) of content moving by a random step in {-1, 0, 1}² cells per frame."""
    h, w = grid_hw
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


def _testbed(frames: int, cfg: float) -> tuple:
    """``bench/consistency.py``'s held-out clip on the trained test model (real host): (the model, the clip's
    latent, its trajectories from the ground-truth flow, ``edit(model, x_T, sigmas)`` sampling the target prompt
    with euler at ``cfg`` from x_T)."""
    import comfy.sample
    import comfy.samplers
    from tve.flow.estimate import FlowField
    from tve.flow.trajectories import build_trajectories
    from tve.tests.trained_model import load_trained_model, trained_conditioning
    from tve.tools.train_test_model import FRAME_SIZE, HELD_OUT_SEED
    from tve.tools.video_world import frames_to_latent, render_clip
    clip = render_clip(frames, FRAME_SIZE, FRAME_SIZE, seed=HELD_OUT_SEED, sprites=2)
    flow = FlowField(clip.flow_forward, clip.flow_backward, clip.occlusion_forward, "ground truth")
    latent = frames_to_latent(clip.frames)
    trajectories = build_trajectories(flow, tuple(latent.shape[-2:]), seed=0)

    def edit(patched, x_T: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        return comfy.sample.sample_custom(patched, torch.zeros_like(x_T), cfg, comfy.samplers.sampler_object("euler"),
                                          sigmas, trained_conditioning("target"), trained_conditioning("empty"),
                                          x_T, disable_pbar=True, seed=0)

    return load_trained_model(), latent, trajectories, edit


def figure_edit_vs_cfg(frames: int = 16, steps: int = 25, cfg: float = 5.0, repeats: int = 3,
                       backends: tuple = ("sub_quad", "pytorch"), profile: bool = True) -> None:
    """FLATTEN edit / plain CFG and per-frame PnP / plain CFG, the trained test model (real host), per backend.

    The edits of ``bench/consistency.py`` (16 frames, 16×16 latent, 25 steps, cfg 5, a held-out clip and its
    ground-truth flow): plain CFG sampling, per-frame PnP (injection, TokenFlow's blocks) and FLATTEN + PnP
    (FLATTEN's blocks), interleaved (``_timing.interleaved``: best and median of ``repeats`` rounds), once for each
    of the host's attention ``backends`` (sub-quadratic, ComfyUI's CPU default; torch SDPA, its default on NVIDIA
    GPUs), selected per model through the host's attention override. ``FLATTEN, trajectory attention by the host``
    is the same edit with trajectory attention given the host's attention callable (FLATTEN's node today runs it
    in torch SDPA whatever the host's backend). With ``profile``, FLATTEN's pieces are timed once per backend
    (timers around the node's calls): dense attention per token grid and per number of CFG chunks it computed
    (1 = the source pass, or cond and uncond computed once because they were still equal), trajectory attention,
    and the rest of the UNet.
    """
    if not os.environ.get("COMFYUI_PATH"):
        print("skipped: FLATTEN edit / plain CFG needs the real host (set COMFYUI_PATH)")
        return
    import tve.engine.flatten as flatten_node
    from tve.engine.injection import apply_feature_injection
    from tve.engine.inversion import invert
    from tve.tests.trained_model import trained_conditioning
    base, latent, trajectories, sample = _testbed(frames, cfg)
    x_T, inversion = invert(base, latent, trained_conditioning("source"), steps, "ddim_uniform")

    def edit(patched) -> None:
        sample(patched, x_T, inversion.sigmas)

    pack_trajectory = flatten_node.trajectory_attention

    class HostTrajectory:
        """The FLATTEN edit with trajectory attention given the host's attention function ``backend`` (the node
        passes none today; bench-only)."""

        def __init__(self, model, backend: str):
            self.model, self.attention = model, _timing.attention_function(backend)

        def __call__(self) -> None:
            flatten_node.trajectory_attention = functools.partial(pack_trajectory, attention=self.attention)
            try:
                edit(self.model)
            finally:
                flatten_node.trajectory_attention = pack_trajectory

    setting = f"{frames} frames, 16x16 latent, {steps} steps, cfg {cfg}, trained test model, CPU"
    _timing.header(f"FLATTEN edit vs plain CFG, {setting}")
    for backend in backends:
        model = _timing.with_attention(base, backend)
        pnp = apply_feature_injection(model, inversion, 0.5, 0.8, "tokenflow", "sigma-matched")
        flatten = apply_feature_injection(flatten_node.apply_flatten(model, trajectories, "highest resolution",
                                                                     "dense_output"), inversion, 0.5, 0.8,
                                          "flatten", "sigma-matched")
        runs = {"plain": lambda m=model: edit(m), "pnp": lambda m=pnp: edit(m), "flatten": lambda m=flatten: edit(m),
                "flatten, host trajectory": HostTrajectory(flatten, backend)}
        times = _timing.interleaved(runs, repeats)
        label = _timing.backend_label(backend)
        print(f"## host attention: {label}")
        print(_timing.ratio_line(times, "flatten", "plain", f"FLATTEN edit / plain CFG sampling [{label}]"))
        print(_timing.ratio_line(times, "pnp", "plain", f"per-frame PnP edit / plain CFG sampling [{label}]"))
        print(_timing.ratio_line(times, "flatten", "pnp", f"FLATTEN edit / per-frame PnP edit [{label}]"))
        print(_timing.ratio_line(times, "flatten, host trajectory", "flatten",
                                 f"FLATTEN with trajectory attention by the host's attention / by torch SDPA "
                                 f"[{label}]"), flush=True)
        if profile:
            _profile(flatten_node, lambda m=flatten: edit(m), frames)


def _profile(flatten_node, edit, frames: int) -> None:
    """One more FLATTEN edit with timers around the node's dense and trajectory attention calls."""
    profile: dict = {}

    def timed(name: str, fn):
        def wrapper(q, k, v, *args, **kwargs):
            start = time.perf_counter()
            out = fn(q, k, v, *args, **kwargs)
            key = (name, q.shape[1], q.shape[0] // frames)                 # (tokens per frame, chunks computed)
            seconds, calls = profile.get(key, (0.0, 0))
            profile[key] = (seconds + time.perf_counter() - start, calls + 1)
            return out
        return wrapper

    dense, trajectory = flatten_node.dense_attention, flatten_node.trajectory_attention
    flatten_node.dense_attention = timed("dense attention", dense)
    flatten_node.trajectory_attention = timed("trajectory attention", trajectory)
    start = time.perf_counter()
    try:
        edit()
    finally:
        flatten_node.dense_attention, flatten_node.trajectory_attention = dense, trajectory
    total = time.perf_counter() - start
    inside = 0.0
    for (name, tokens, chunks), (seconds, calls) in sorted(profile.items(), key=lambda kv: -kv[1][0]):
        inside += seconds
        print(f"  {seconds / total:.3f} of the FLATTEN edit ({seconds:.1f} s of {total:.1f} s): {name}, "
              f"{tokens} tokens/frame, {chunks} chunk(s) computed, {calls} calls")
    print(f"  {(total - inside) / total:.3f} of the FLATTEN edit ({total - inside:.1f} s): everything else (the "
          f"UNet's convolutions, projections and cross-attention in the source and edit passes, the equal-chunk "
          f"check, the sampler)", flush=True)


# FLATTEN's PnP blocks on SD1.5 at 512x512 (64x64 latent): the self-attention inputs of output blocks 4-5 (16x16 tokens,
# 1280 channels), 6-8 (32x32, 640) and 9 (64x64, 320), and the ResBlock branches of output blocks 3-4 (1280 at 16x16)
# and 6 (640 at 32x32): what the inversion keeps per frame and stored step (engine/injection.py, preset flatten).
SD15_512_FEATURES = 2 * 16 * 16 * 1280 + 3 * 32 * 32 * 640 + 64 * 64 * 320 + 2 * 1280 * 16 * 16 + 640 * 32 * 32


def figure_stored_features(frames: int = 16, steps: int = 25, cfg: float = 5.0, repeats: int = 3,
                           backends: tuple = ("sub_quad", "pytorch")) -> None:
    """FLATTEN + PnP (FLATTEN's blocks, the official thresholds 0.8/0.8) with the source's features from a live
    source pass each step or stored by the inversion (``source_features: stored``, 0.8 of the steps), against
    plain CFG; the inversions (with and without storing) against each other; the memory the stored features take,
    measured here and worked out for SD1.5 at 512x512 in fp16. The trained test model (real host), 16x16 latent,
    ``bench/consistency.py``'s clip; each edit inverts with its own FLATTEN model (the paper's way), formula
    next_sigma (the default). Interleaved per backend, best and median of ``repeats``."""
    if not os.environ.get("COMFYUI_PATH"):
        print("skipped: FLATTEN stored features need the real host (set COMFYUI_PATH)")
        return
    from tve.engine.flatten import apply_flatten
    from tve.engine.injection import apply_feature_injection
    from tve.engine.inversion import invert
    from tve.tests.trained_model import trained_conditioning
    base, latent, trajectories, edit = _testbed(frames, cfg)
    source = trained_conditioning("source")

    setting = f"{frames} frames, 16x16 latent, {steps} steps, cfg {cfg}, trained test model, CPU"
    _timing.header(f"FLATTEN with stored vs live source features, {setting}")
    for backend in backends:
        model = _timing.with_attention(base, backend)
        flatten = {mode: apply_flatten(model, trajectories, "highest resolution", "dense_output", True, mode, 0.8)
                   for mode in ("live", "stored")}
        inverted = {mode: invert(m, latent, source, steps, "ddim_uniform") for mode, m in flatten.items()}
        edits = {mode: apply_feature_injection(flatten[mode], inverted[mode][1], 0.8, 0.8, "flatten",
                                               "sigma-matched") for mode in flatten}
        x_T, sigmas = inverted["live"][0], inverted["live"][1].sigmas
        same = torch.equal(edit(edits["live"], x_T, sigmas), edit(edits["stored"], x_T, sigmas))
        runs = {"plain": lambda: edit(model, x_T, sigmas),
                "FLATTEN, live source": lambda: edit(edits["live"], x_T, sigmas),
                "FLATTEN, stored source": lambda: edit(edits["stored"], x_T, sigmas),
                "inversion": lambda: invert(flatten["live"], latent, source, steps, "ddim_uniform"),
                "inversion, storing": lambda: invert(flatten["stored"], latent, source, steps, "ddim_uniform")}
        times = _timing.interleaved(runs, repeats)
        label = _timing.backend_label(backend)
        print(f"## host attention: {label}; the two edits are bit-identical: {same}")
        for num, den in (("FLATTEN, live source", "plain"), ("FLATTEN, stored source", "plain"),
                         ("FLATTEN, stored source", "FLATTEN, live source"), ("inversion, storing", "inversion")):
            print(_timing.ratio_line(times, num, den, f"{num} / {den} [{label}]"), flush=True)
    stored = inverted["stored"][1].stored
    per_frame_step = stored.nbytes / frames / stored.steps
    print(f"stored features here: {stored.describe(frames, steps)}, {per_frame_step / 1024:.1f} KiB per frame and "
          "step")
    sd15 = SD15_512_FEATURES * 2
    print(f"stored features, SD1.5 at 512x512, fp16: {sd15 / (1 << 20):.1f} MiB per frame and step; 40 of 50 "
          f"steps: {40 * sd15 / (1 << 20):.0f} MiB per frame, {16 * 40 * sd15 / (1 << 30):.1f} GiB for 16 frames, "
          f"{120 * 40 * sd15 / (1 << 30):.1f} GiB for 120", flush=True)


def figure_trajectory_backends(baseline: str, frames: int = 16, grids: tuple = ((32, 32), (64, 64)),
                               channels: int = 320, heads: int = 8, repeats: int = 3,
                               backends: tuple = ("sub_quad", "pytorch"), device: str = "cpu",
                               dtype: torch.dtype = torch.float32) -> None:
    """Trajectory attention of one block (C=320, 8 heads, 2 CFG chunks, trajectories of a random smooth
    translation) in the working tree against ``baseline`` (a git revision's ``attention/flatten.py``), each run by
    torch SDPA (the pack's default) and by each of the host's ``backends`` (real host), interleaved; on
    ``device`` (e.g. cuda, no host needed) in ``dtype``."""
    old = _module_at(baseline, "attention/flatten.py")
    functions = {"torch SDPA": None}
    if os.environ.get("COMFYUI_PATH"):
        functions.update({_timing.backend_label(b): _timing.attention_function(b) for b in backends})
    for h, w in grids:
        torch.manual_seed(0)
        tracks, track_of = translation_trajectories(frames, grid_hw=(h, w))
        x = torch.randn(CHUNKS * frames, h * w, channels).to(device, dtype)
        indices = {"now": trajectory_index(tracks, track_of).to(device),
                   baseline: old.trajectory_index(tracks, track_of).to(device)}
        runs = {}
        for label, function in functions.items():
            runs[f"now, {label}"] = functools.partial(trajectory_attention, x, x, x, indices["now"], heads, CHUNKS,
                                                      attention=function)
            runs[f"{baseline}, {label}"] = functools.partial(old.trajectory_attention, x, x, x, indices[baseline],
                                                             heads, CHUNKS, attention=function)
        reference = runs[f"{baseline}, torch SDPA"]()
        worst = max(float((run() - reference).abs().max()) for run in runs.values())
        times = _timing.interleaved(runs, repeats, device=device)
        print(f"## trajectory attention, {frames} frames at {h}x{w} tokens, C={channels}, {heads} heads, {dtype} on "
              f"{device}, "
              f"{len(indices['now'].groups)} row groups now, {len(indices[baseline].groups)} at {baseline}; "
              f"largest difference to {baseline} with SDPA {worst:.1e}")
        for name in runs:
            print("  " + _timing.ratio_line(times, name, f"{baseline}, torch SDPA", name), flush=True)


def _module_at(revision: str, path: str):
    """The pack's module ``path`` as it was at git ``revision``, imported under a private name."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "-C", str(root), "show", f"{revision}:{path}"], check=True, capture_output=True,
                            text=True).stdout
    file = Path(os.environ.get("TMPDIR", "/tmp")) / f"tve_{revision.replace('/', '_')}_{Path(path).stem}.py"
    file.write_text(source)
    name = f"tve_at_{revision.replace('/', '_').replace('-', '_')}_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def figure_block_cost(grids: tuple = ((16, 16), (32, 32), (64, 64)), channels: int = 64, heads: int = 2,
                      repeats: int = 3) -> None:
    """One self-attention block of the test model's width (C=64, 2 heads, 2 CFG chunks, fp32): dense attention
    over all frames and trajectory attention, each against per-frame attention, per token grid; 16 frames except
    4 at 64×64 (dense cost grows as F²·T²; 16 frames there take minutes on a 2-core CPU). Backend: torch SDPA.
    Interleaved, best of ``repeats``."""
    from tve.attention.cross_frame import dense_attention
    from tve.attention.frames import sdpa_attention
    for h, w in grids:
        frames = 4 if h * w > 2048 else 16
        torch.manual_seed(0)
        q, k, v = (torch.randn(CHUNKS * frames, h * w, channels) for _ in range(3))
        tracks, track_of = translation_trajectories(frames, grid_hw=(h, w))
        index = trajectory_index(tracks, track_of)
        times = _timing.interleaved({"per-frame": lambda: sdpa_attention(q, k, v, heads),
                                     "dense": lambda: dense_attention(q, k, v, heads, CHUNKS),
                                     "trajectory": lambda: trajectory_attention(v, v, v, index, heads, CHUNKS)},
                                    repeats)
        print(f"{_timing.ratio(times, 'dense', 'per-frame')} dense / per-frame attention, "
              f"{_timing.ratio(times, 'trajectory', 'per-frame')} trajectory / per-frame, at {h}x{w} tokens, "
              f"{frames} frames ({times['dense'].best * 1e3:.0f} / {times['trajectory'].best * 1e3:.0f} / "
              f"{times['per-frame'].best * 1e3:.0f} ms best)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--figures", nargs="+", default=["per-query", "memory", "block", "trajectory", "edit", "stored"],
                    choices=["per-query", "memory", "block", "trajectory", "edit", "stored"])
    ap.add_argument("--baseline", default="main", help="git revision whose trajectory attention the working tree's "
                    "is timed against (figure 'trajectory')")
    ap.add_argument("--device", default="cpu", help="figure 'trajectory': the device (e.g. cuda)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="figure 'trajectory': the dtype")
    ap.add_argument("--edit-frames", type=int, default=16)
    ap.add_argument("--edit-steps", type=int, default=25)
    ap.add_argument("--no-profile", action="store_true", help="edit figure without the FLATTEN profile")
    ap.add_argument("--measure", nargs=3, metavar=("METHOD", "FRAMES", "REPEATS"), help=argparse.SUPPRESS)
    _timing.add_arguments(ap)
    opts = ap.parse_args()
    if os.environ.get("COMFYUI_PATH"):
        _tve.real_host()
    _timing.pin_threads(opts.threads)
    if opts.measure:
        method, frames, repeats = opts.measure
        print(json.dumps(measure(method, int(frames), int(repeats))))
        return
    cache: dict = {}
    if "per-query" in opts.figures:
        figure_grouped_vs_per_query(opts.frames, cache)
    if "memory" in opts.figures:
        figure_grouped_memory_vs_output(opts.frames, cache)
    if "block" in opts.figures:
        figure_block_cost(repeats=opts.repeats)
    if "trajectory" in opts.figures:
        _timing.header("trajectory attention of one block")
        figure_trajectory_backends(opts.baseline, repeats=opts.repeats, backends=tuple(opts.backends),
                                   device=opts.device, dtype=getattr(torch, opts.dtype))
    if "stored" in opts.figures:
        figure_stored_features(opts.edit_frames, opts.edit_steps, repeats=opts.repeats, backends=tuple(opts.backends))
    if "edit" in opts.figures:
        figure_edit_vs_cfg(opts.edit_frames, opts.edit_steps, repeats=opts.repeats, backends=tuple(opts.backends),
                           profile=not opts.no_profile)


if __name__ == "__main__":
    main()
