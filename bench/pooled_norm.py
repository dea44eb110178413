"""Does FLATTEN's frame-pooled GroupNorm help the other modes? The consistency testbed (real host), each mode with
and without ResBlock / output norms pooled over the frames, inversion included.

    COMFYUI_PATH=/path/to/ComfyUI python bench/pooled_norm.py [--clips 1] [--frames 16] [--steps 25]

For each clip the source is inverted twice (per-frame norms, pooled norms) and every mode edits its own variant's
inverted latents with PnP injection, as ``bench/consistency.py`` does (its measures, its target, its defaults but the
clip count). Pooled norms are put on for the whole run with ``host.calls_in_layout`` (what FLATTEN's
``frame_pooled_norm`` does), all frames in one pass (``--frames`` at most 16, one window). FLATTEN itself uses its
node input. One line per mode: the pooled / per-frame ratio of warp error (lower: less flicker), edit strength and
structure error first, then both runs as ratios to per-frame PnP without pooling.
"""
import argparse
import contextlib

import _tve

_tve.real_host()

import torch  # noqa: E402

from consistency import cross_frame, measures, procedural_clip  # noqa: E402
from tve.attention.group_norm import frame_layout, video_layout  # noqa: E402
from tve.engine import host  # noqa: E402
from tve.engine.flatten import apply_flatten  # noqa: E402
from tve.engine.injection import apply_feature_injection  # noqa: E402
from tve.engine.inversion import invert  # noqa: E402
from tve.flow.trajectories import build_trajectories  # noqa: E402
from tve.tests.trained_model import load_trained_model, trained_conditioning  # noqa: E402
from tve.tools.edit_measures import latent_flow  # noqa: E402
from tve.tools.train_test_model import TESTBEDS  # noqa: E402
from tve.tools.video_world import LATENT_SCALE, frames_to_latent  # noqa: E402

BENCH_MODES = ["per-frame PnP", "anchor", "keyframes", "dense", "FLATTEN"]


def pooled(model, frames: int, on: bool):
    """All ResBlock / output GroupNorms of ``model`` pooled over ``frames`` frames per chunk while open (if ``on``)."""
    if not on:
        return contextlib.nullcontext()
    return host.calls_in_layout(host.resblock_group_norms(model).values(), lambda x: video_layout(x, frames),
                                frame_layout)


def edit_model(model, mode: str, inversion, trajectories, on: bool):
    pnp = lambda m, preset="tokenflow": apply_feature_injection(m, inversion, 0.5, 0.8, preset,  # noqa: E731
                                                                "sigma-matched")
    if mode == "per-frame PnP":
        return pnp(model)
    if mode == "FLATTEN":
        return pnp(apply_flatten(model, trajectories, "highest resolution", "dense_output", on), "flatten")
    return pnp(cross_frame(model, mode))


def main() -> None:
    import comfy.sample
    import comfy.samplers
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", choices=sorted(TESTBEDS), default="test_model_256")
    ap.add_argument("--clips", type=int, default=1)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", choices=BENCH_MODES, default=BENCH_MODES)
    opts = ap.parse_args()
    if not 2 <= opts.frames <= 16:
        raise SystemExit("--frames: 2 to 16 (one pass holds them all)")
    torch.set_num_threads(1)
    size = TESTBEDS[opts.testbed].frame_size
    period = TESTBEDS[opts.testbed].stripe_period / LATENT_SCALE
    model = load_trained_model(opts.testbed)
    cond = lambda name: trained_conditioning(name, opts.testbed)  # noqa: E731
    totals: dict = {}
    for index in range(opts.clips):
        frames_rgb, flow = procedural_clip(index, opts.frames, size)
        raw = frames_to_latent(frames_rgb)
        trajectories = build_trajectories(flow, tuple(raw.shape[-2:]), seed=opts.seed)
        cell_flow, occluded = latent_flow(flow.forward, flow.occlusion)
        for on in (False, True):
            with pooled(model, opts.frames, on):
                x_T, inversion = invert(model, raw, cond("source"), opts.steps, "ddim_uniform")
            for mode in opts.modes:
                patched = edit_model(model, mode, inversion, trajectories, on)
                with pooled(model, opts.frames, on and mode != "FLATTEN"):
                    out = comfy.sample.sample_custom(patched, torch.zeros_like(x_T), opts.cfg,
                                                     comfy.samplers.sampler_object("euler"), inversion.sigmas,
                                                     cond("target"), cond("empty"), x_T, disable_pbar=True,
                                                     seed=opts.seed)
                row = measures(out, frames_rgb, cell_flow, occluded, period)
                for key, value in row.items():
                    totals.setdefault((mode, on), {}).setdefault(key, []).append(value)
                print(f"  clip {index} {mode} pooled={on}: warp {row['warp']:.4f}", flush=True)
    mean = {k: {m: sum(v) / len(v) for m, v in row.items()} for k, row in totals.items()}
    base = mean.get(("per-frame PnP", False))
    print(f"# {opts.testbed}: {opts.clips} clip(s), {opts.frames} frames, {opts.steps} steps, cfg {opts.cfg}; "
          "pooled / per-frame norms, then each as a ratio to per-frame PnP without pooling")
    for mode in opts.modes:
        off, on = mean[(mode, False)], mean[(mode, True)]
        line = "  ".join(f"{on[k] / off[k]:.3f}x {k}" for k in ("warp", "strength", "structure"))
        if base is not None:
            line += "  | " + ", ".join(f"{name} warp {row['warp'] / base['warp']:.3f} strength "
                                       f"{row['strength'] / base['strength']:.2f} structure "
                                       f"{row['structure'] / base['structure']:.2f}"
                                       for name, row in (("per-frame", off), ("pooled", on)))
        print(f"{line}  | {mode}", flush=True)


if __name__ == "__main__":
    main()
