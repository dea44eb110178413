"""Does each method remove flicker? The pack's trained test model on held-out procedural clips (real host).

    COMFYUI_PATH=/path/to/ComfyUI python bench/consistency.py [--video PATH] [--clips 2] [--frames 16]

Every mode edits the SAME inverted latents (inversion with ``source``) to ``target`` with the same steps, CFG and
seed: per-frame PnP (the baseline), anchor attention, keyframe (extended) attention, TokenFlow, FLATTEN, and
TokenFlow + FLATTEN, each with PnP injection. ``target`` = a deterministic recolour + stripes whose angle and phase
the model draws per sample, so frame-by-frame editing draws other stripes in every frame.

Per mode (ratio to per-frame first):
- latent warp error: frame t+1's output latent backward-warped into frame t's cells with the source flow
  (ground truth for procedural clips, the pack's own DIS flow for a real video) averaged over each latent cell,
  squared error summed over channels, mean over the cells no occluded pixel touches, mean over pairs;
- fidelity error: the output decoded to RGB (the test latent space's pseudo-inverse) and the recoloured source,
  both low-passed over one stripe period (4×4 cells), mean squared error — the deterministic part of the style;
- wall time.
Targets (issue 7): TokenFlow warp ≤ 1/4 of per-frame, FLATTEN ≤ 1/3, both stacked ≤ 1/5, each fidelity ≤ 1.2×.
"""
import argparse
import time

import _tve

_tve.real_host()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tve.flow.estimate import FlowField, estimate_flow  # noqa: E402
from tve.flow.trajectories import build_trajectories  # noqa: E402
from tve.flow.warp import backward_warp  # noqa: E402
from tve.nodes.cross_frame import apply_cross_frame  # noqa: E402
from tve.nodes.flatten import apply_flatten  # noqa: E402
from tve.nodes.injection import apply_feature_injection  # noqa: E402
from tve.nodes.inversion import invert  # noqa: E402
from tve.nodes.tokenflow import apply_tokenflow  # noqa: E402
from tve.tests.trained_model import load_trained_model, trained_conditioning  # noqa: E402
from tve.tools.train_test_model import HELD_OUT_SEED, recolour  # noqa: E402
from tve.tools.video_world import LATENT_SCALE, frames_to_latent, latent_to_frames, render_clip  # noqa: E402

MODES = ["per-frame PnP", "anchor", "keyframes", "TokenFlow", "FLATTEN", "TokenFlow+FLATTEN"]
TARGETS = {"TokenFlow": 1 / 4, "FLATTEN": 1 / 3, "TokenFlow+FLATTEN": 1 / 5}


def cross_frame(model, mode: str):
    return apply_cross_frame(model, mode, 8, 0, False, 2, 0, "all", 0.0, 1.0)


def edit_models(model, inversion, trajectories, seed: int) -> dict:
    pnp = lambda m: apply_feature_injection(m, inversion, 0.5, 0.8, "tokenflow", "sigma-matched")  # noqa: E731
    flatten = apply_flatten(model, trajectories, "highest resolution", "dense_output")
    return {
        "per-frame PnP": pnp(model),
        "anchor": pnp(cross_frame(model, "anchor")),
        "keyframes": pnp(cross_frame(model, "keyframes")),
        "TokenFlow": apply_tokenflow(model, inversion, 8, seed, "paper", 0.5, 0.8),
        "FLATTEN": apply_feature_injection(flatten, inversion, 0.5, 0.8, "flatten", "sigma-matched"),
        "TokenFlow+FLATTEN": apply_tokenflow(flatten, inversion, 8, seed, "paper", 0.5, 0.8),
    }


def latent_flow(flow: FlowField) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel flow averaged over each latent cell in cell units, and cells that any occluded pixel touches."""
    forward = F.avg_pool2d(flow.forward, LATENT_SCALE) / LATENT_SCALE                     # (F-1, 2, h, w)
    occluded = F.max_pool2d(flow.occlusion.float()[:, None], LATENT_SCALE)[:, 0] > 0     # (F-1, h, w)
    return forward, occluded


def latent_warp_error(latents: torch.Tensor, forward: torch.Tensor, occluded: torch.Tensor) -> float:
    x = latents.float()
    warped, valid = backward_warp(x[1:], forward)
    visible = (valid & ~occluded).float()
    per_pair = (((warped - x[:-1]) ** 2).sum(1) * visible).sum((1, 2)) / visible.sum((1, 2)).clamp(min=1)
    return float(per_pair.mean())


def fidelity_error(latents: torch.Tensor, source_frames: torch.Tensor) -> float:
    def low_pass(frames):                                   # (F, H, W, 3) → over 4×4 cells (one stripe period)
        return F.avg_pool2d(frames.permute(0, 3, 1, 2).float(), 4 * LATENT_SCALE, ceil_mode=True)

    return float(((low_pass(latent_to_frames(latents.float())) - low_pass(recolour(source_frames.float()))) ** 2)
                 .mean())


def procedural_clip(index: int, frames: int, size: int):
    clip = render_clip(frames, size, size, seed=HELD_OUT_SEED + index, sprites=2)
    flow = FlowField(clip.flow_forward, clip.flow_backward, clip.occlusion_forward, "ground truth")
    return clip.frames, flow


def video_clip(path: str, frames: int, size: int):
    import av
    with av.open(path) as container:
        images = [f.to_ndarray(format="rgb24") for _, f in zip(range(frames), container.decode(video=0))]
    video = torch.from_numpy(__import__("numpy").stack(images)).float() / 255
    video = F.interpolate(video.permute(0, 3, 1, 2), size=(size, size), mode="area").permute(0, 2, 3, 1)
    return video, estimate_flow(video, "dis")


def run_clip(frames_rgb: torch.Tensor, flow: FlowField, steps: int, cfg: float, seed: int) -> dict:
    model = load_trained_model()
    raw = frames_to_latent(frames_rgb)
    x_T, inversion = invert(model, raw, trained_conditioning("source"), steps, "ddim_uniform")
    size = tuple(raw.shape[-2:])
    trajectories = build_trajectories(flow, size, seed=seed)
    forward, occluded = latent_flow(flow)
    rows = {}
    for mode, patched in edit_models(model, inversion, trajectories, seed).items():
        import comfy.sample
        import comfy.samplers
        start = time.perf_counter()
        out = comfy.sample.sample_custom(patched, torch.zeros_like(x_T), cfg, comfy.samplers.sampler_object("euler"),
                                         inversion.sigmas, trained_conditioning("target"),
                                         trained_conditioning("empty"), x_T, disable_pbar=True, seed=seed)
        rows[mode] = {"warp": latent_warp_error(out, forward, occluded), "fidelity": fidelity_error(out, frames_rgb),
                      "time": time.perf_counter() - start}
    rows["source"] = {"warp": latent_warp_error(raw, forward, occluded), "fidelity": float("nan"), "time": 0.0}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--video", help="a real video file (its own DIS flow is used)")
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=128, help="frame size in pixels (latent = size / 8)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()
    torch.manual_seed(opts.seed)
    clips = ([video_clip(opts.video, opts.frames, opts.size)] if opts.video else
             [procedural_clip(i, opts.frames, opts.size) for i in range(opts.clips)])
    totals: dict = {}
    for frames_rgb, flow in clips:
        for mode, row in run_clip(frames_rgb, flow, opts.steps, opts.cfg, opts.seed).items():
            for key, value in row.items():
                totals.setdefault(mode, {}).setdefault(key, []).append(value)
    mean = {mode: {k: sum(v) / len(v) for k, v in row.items()} for mode, row in totals.items()}
    base = mean["per-frame PnP"]
    source = "DIS flow" if opts.video else "ground-truth flow"
    print(f"# {len(clips)} clip(s), {opts.frames} frames, {opts.size}x{opts.size} px ({opts.size // 8}x"
          f"{opts.size // 8} latent), {opts.steps} steps, cfg {opts.cfg}, {source}; source video's own latent warp "
          f"error {mean['source']['warp']:.4f}")
    for mode in MODES:
        row = mean[mode]
        warp_ratio, fid_ratio = row["warp"] / base["warp"], row["fidelity"] / base["fidelity"]
        target = f" (target <= {TARGETS[mode]:.2f}, {'met' if warp_ratio <= TARGETS[mode] else 'MISSED'})" \
            if mode in TARGETS else ""
        fid_note = f" ({'met' if fid_ratio <= 1.2 else 'MISSED'} <= 1.2)" if mode in TARGETS else ""
        print(f"{warp_ratio:.3f}x warp / per-frame{target}  {fid_ratio:.2f}x fidelity{fid_note}  "
              f"{row['time'] / base['time']:.2f}x time  | {mode}: warp {row['warp']:.4f}, fidelity "
              f"{row['fidelity']:.5f}, {row['time']:.1f} s")


if __name__ == "__main__":
    main()
