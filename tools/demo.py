"""The pack's main job on an embedded default: edit a procedural clip with the bundled test model, three ways.

Run it from a ComfyUI install (no download, no checkpoint):

    python custom_nodes/ComfyUI-TextVideoEdit/tools/demo.py          # the pack in ComfyUI/custom_nodes/
    COMFYUI_PATH=/path/to/ComfyUI python tools/demo.py               # or from the pack's folder

A held-out clip of the procedural video world (``tools/video_world.py``: textured sprites over a moving textured
background, exact flow and occlusion) is inverted with the pack's trained test model (``tools/test_model``: a small
SD1.5-architecture UNet trained on that world) and edited to the model's ``target`` style (a recolour plus stripes
whose angle and phase the model draws per sample) three ways, from the same inverted latents, with the same steps,
CFG and seed:

- per-frame PnP (``TVE_ApplyFeatureInjection``): every frame edited on its own, so every frame draws other stripes;
- TokenFlow (``TVE_ApplyTokenFlow``): keyframes edited jointly, their features propagated to every frame;
- FLATTEN (``TVE_ApplyFLATTEN`` on trajectories of the pack's own DIS flow, with FLATTEN's PnP blocks).

It writes ``demo.mp4`` (source | per-frame PnP | TokenFlow | FLATTEN, labelled), ``strip.png`` (a few frames of
each), and ``figures.json``, and prints the consistency figures of the Consistency Metrics node: warp error ×10³
(Lai et al. 2018) and flicker under the world's exact flow, per method and for the source itself. Default output
folder: ``<ComfyUI>/output/tve_demo``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _tve_alias  # noqa: E402  (the pack as package ``tve``)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

METHODS = ("per-frame PnP", "TokenFlow", "FLATTEN")
CLIP_SEED = 100_007              # a held-out seed of the video world (training used seeds below 100 000)
FRAME_SIZE = 128                 # what the test model was trained on (16 × 16 latents)


def edit_models(model, inversion, trajectories, seed: int) -> dict:
    """The three patched MODELs, built with the node functions the shipped workflows use."""
    from tve.nodes.flatten import apply_flatten
    from tve.nodes.injection import apply_feature_injection
    from tve.nodes.tokenflow import apply_tokenflow
    flatten = apply_flatten(model, trajectories, "highest resolution", "dense_output")
    return {
        "per-frame PnP": apply_feature_injection(model, inversion, 0.5, 0.8, "tokenflow", "sigma-matched"),
        "TokenFlow": apply_tokenflow(model, inversion, 8, seed, "paper", 0.5, 0.8),
        "FLATTEN": apply_feature_injection(flatten, inversion, 0.5, 0.8, "flatten", "sigma-matched"),
    }


def labelled(frames: torch.Tensor, label: str, scale: int, bar: int) -> torch.Tensor:
    """(F, H, W, 3) → (F, bar + H·scale, W·scale, 3): nearest-upscaled frames under a title bar."""
    from PIL import Image, ImageDraw, ImageFont
    big = F.interpolate(frames.permute(0, 3, 1, 2), scale_factor=scale, mode="nearest").permute(0, 2, 3, 1)
    title = Image.new("RGB", (big.shape[2], bar), (24, 24, 24))
    try:
        font = ImageFont.load_default(size=bar * 2 // 3)
    except TypeError:                                   # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    ImageDraw.Draw(title).text((8, bar // 6), label, fill=(235, 235, 235), font=font)
    header = torch.from_numpy(np.asarray(title, dtype=np.float32) / 255)              # (bar, W·scale, 3)
    return torch.cat([header.expand(big.shape[0], -1, -1, -1), big], dim=1)


def write_video(frames: torch.Tensor, path: Path, fps: int) -> None:
    """(F, H, W, 3) in [0, 1] → H.264 mp4 (PyAV, which ComfyUI installs)."""
    import av
    data = (frames.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = data.shape[2], data.shape[1], "yuv420p"
        stream.options = {"crf": "16"}
        for frame in data:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def write_strip(rows: dict[str, torch.Tensor], path: Path, columns: int) -> None:
    """A PNG of ``columns`` evenly spaced frames of each labelled row, one row per method."""
    from PIL import Image
    frames = next(iter(rows.values())).shape[0]
    picks = torch.linspace(0, frames - 1, columns).round().long()
    grid = torch.cat([torch.cat(list(row[picks]), dim=1) for row in rows.values()], dim=0)
    Image.fromarray((grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="output folder (default: <ComfyUI>/output/tve_demo)")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25, help="inversion and sampling steps")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=int, default=2, help="display upscale of each panel")
    opts = ap.parse_args()
    if opts.frames < 2 or opts.steps < 2:
        ap.error("--frames and --steps must be at least 2")
    comfyui = _tve_alias.real_host()
    out = opts.out or comfyui / "output" / "tve_demo"
    out.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    from tve.flow.consistency import measure_consistency
    from tve.flow.estimate import estimate_flow
    from tve.flow.trajectories import build_trajectories
    from tve.nodes import host
    from tve.nodes.inversion import invert
    from tve.tools.train_test_model import load
    from tve.tools.video_world import frames_to_latent, latent_to_frames, render_clip

    torch.manual_seed(opts.seed)
    total = opts.steps * (1 + len(METHODS))
    with tqdm(total=total, desc="TVE demo", unit="step") as bar:
        done = [0]

        def advance(value: int, of: int) -> None:          # each run reports 1..steps; the bar counts them all
            bar.n = done[0] + value
            bar.refresh()

        host.report_progress_to(advance)
        clip = render_clip(opts.frames, FRAME_SIZE, FRAME_SIZE, seed=CLIP_SEED, sprites=2)
        model, conditioning = load(Path(__file__).resolve().parent / "test_model")
        raw = frames_to_latent(clip.frames)

        bar.set_postfix_str("DDIM inversion")
        x_T, inversion = invert(model, raw, conditioning["source"], opts.steps, "ddim_uniform")
        done[0] += opts.steps
        flow = estimate_flow(clip.frames, "dis")
        trajectories = build_trajectories(flow, tuple(raw.shape[-2:]), seed=opts.seed)
        outputs, seconds = {}, {}
        for name, patched in edit_models(model, inversion, trajectories, opts.seed).items():
            bar.set_postfix_str(name)
            start = time.perf_counter()
            latent = host.sample_euler_guided(patched, torch.zeros_like(x_T), x_T, inversion.sigmas,
                                              conditioning["target"], conditioning["empty"], opts.cfg, opts.seed,
                                              callback=host.step_callback(opts.steps))
            seconds[name] = time.perf_counter() - start
            outputs[name] = latent_to_frames(latent.float()).clamp(0, 1)
            done[0] += opts.steps
        host.report_progress_to(None)

    exact = (clip.flow_forward, clip.occlusion_forward)
    videos = {"source": clip.frames, **outputs}
    figures = {name: measure_consistency(frames, *exact) for name, frames in videos.items()}
    base = figures["per-frame PnP"].warp_error
    report = {"clip": {"seed": CLIP_SEED, "frames": opts.frames, "size": FRAME_SIZE, "steps": opts.steps,
                       "cfg": opts.cfg, "flow for FLATTEN": "DIS", "flow for the figures": "exact (video world)"},
              "methods": {name: {"warp_error_x1000": c.warp_error * 1e3, "flicker": c.flicker,
                                 "warp_vs_per_frame": c.warp_error / base if base > 0 else float("nan"),
                                 "seconds": seconds.get(name, 0.0)} for name, c in figures.items()}}
    bar_height = 12 * opts.scale
    rows = {name: labelled(frames, name, opts.scale, bar_height) for name, frames in videos.items()}
    write_video(torch.cat(list(rows.values()), dim=2), out / "demo.mp4", fps=8)
    write_strip(rows, out / "strip.png", columns=min(6, opts.frames))
    (out / "figures.json").write_text(json.dumps(report, indent=2), encoding="utf-8")

    print(f"{opts.frames} frames of {FRAME_SIZE}x{FRAME_SIZE}, {opts.steps} steps, cfg {opts.cfg}; "
          "warp error x1e3 / flicker under the exact flow:")
    for name, row in report["methods"].items():
        print(f"  {name:14s} warp {row['warp_error_x1000']:8.3f}  ({row['warp_vs_per_frame']:.2f}x per-frame)  "
              f"flicker {row['flicker']:.5f}" + (f"  {row['seconds']:.1f} s" if row["seconds"] else ""))
    print(f"wrote {out / 'demo.mp4'}, {out / 'strip.png'}, {out / 'figures.json'}")


if __name__ == "__main__":
    main()
