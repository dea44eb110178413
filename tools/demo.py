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
folder: ``<ComfyUI>/output/tve_demo``. While it runs it says on stderr what it is doing: each phase as it starts,
and each model step with the steps done of all, the time per step and an estimate of the time left.
"""
from __future__ import annotations

import argparse
import json
import shutil
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


class Progress:
    """What the demo is doing, on stderr, flushed: a line per phase with the time since the start, and a line per
    model step (rewritten in place on a terminal, one line each in a log) with the steps done of ``total``, the
    mean time per step so far and the time left at that pace."""

    def __init__(self, total: int):
        self.start = time.perf_counter()
        self.total = total                # model steps of all runs together
        self.done = 0                     # steps of the runs already finished
        self.run = ""                     # the run now stepping
        self.stepping_since = None        # when the first run started: the pace counts steps from there
        self.open_line = False            # a step line waits for its end (terminal only)

    def _write(self, line: str, in_place: bool = False) -> None:
        stream = sys.stderr
        if in_place and stream.isatty():                  # one terminal row, so that \r returns to its start
            stream.write("\r\033[K" + line[:shutil.get_terminal_size().columns - 1])
            self.open_line = True
        else:
            stream.write(("\n" if self.open_line else "") + line + "\n")
            self.open_line = False
        stream.flush()

    def _clock(self) -> str:
        return f"TVE demo [{_duration(time.perf_counter() - self.start)}]"

    def phase(self, text: str) -> None:
        self._write(f"{self._clock()} {text}")

    def begin_run(self, name: str, steps: int, title: str = "") -> None:
        """A run of ``steps`` model steps (the inversion, an edit) starts; ``title`` leads its phase line."""
        self.run = name
        if self.stepping_since is None:
            self.stepping_since = time.perf_counter()
        self.phase(f"{title}{name}, {steps} steps ...")

    def step(self, value: int, of: int) -> None:
        """A progress report of the running run: ``value`` of its ``of`` steps are done."""
        done = self.done + value
        pace = (time.perf_counter() - self.stepping_since) / done if done else 0.0
        left = f", about {_duration(pace * (self.total - done))} left" if done < self.total else ""
        self._write(f"{self._clock()}   {done}/{self.total} steps{left}; {self.run} step {value}/{of}, "
                    f"{pace:.1f} s/step", in_place=True)

    def end_run(self, steps: int) -> None:
        self.done += steps


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


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
    progress = Progress(total=opts.steps * (1 + len(METHODS)))
    progress.phase(f"{opts.frames} frames of {FRAME_SIZE}x{FRAME_SIZE}, {opts.steps} steps, cfg {opts.cfg}: "
                   f"a DDIM inversion and {len(METHODS)} edits ({', '.join(METHODS)}), {progress.total} model "
                   "steps in all, on the CPU")
    progress.phase(f"loading ComfyUI ({_tve_alias.find_comfyui() or 'not found'}) and the pack ...")
    comfyui = _tve_alias.real_host()
    out = opts.out or comfyui / "output" / "tve_demo"
    out.mkdir(parents=True, exist_ok=True)

    from tve.flow.consistency import measure_consistency
    from tve.flow.estimate import estimate_flow
    from tve.flow.trajectories import build_trajectories
    from tve.nodes import host
    from tve.nodes.inversion import invert
    from tve.tools.train_test_model import load
    from tve.tools.video_world import frames_to_latent, latent_to_frames, render_clip

    torch.manual_seed(opts.seed)
    host.report_progress_to(progress.step)
    try:
        progress.phase(f"rendering the held-out clip of the video world (seed {CLIP_SEED}) ...")
        clip = render_clip(opts.frames, FRAME_SIZE, FRAME_SIZE, seed=CLIP_SEED, sprites=2)
        progress.phase("loading the test model (tools/test_model) ...")
        model, conditioning = load(Path(__file__).resolve().parent / "test_model")
        raw = frames_to_latent(clip.frames)

        progress.begin_run("DDIM inversion", opts.steps)
        x_T, inversion = invert(model, raw, conditioning["source"], opts.steps, "ddim_uniform")
        progress.end_run(opts.steps)
        progress.phase("DIS optical flow and FLATTEN's trajectories of the clip ...")
        flow = estimate_flow(clip.frames, "dis")
        trajectories = build_trajectories(flow, tuple(raw.shape[-2:]), seed=opts.seed)
        outputs, seconds = {}, {}
        for number, (name, patched) in enumerate(edit_models(model, inversion, trajectories, opts.seed).items(), 1):
            progress.begin_run(name, opts.steps, title=f"edit {number}/{len(METHODS)}: ")
            start = time.perf_counter()
            latent = host.sample_euler_guided(patched, torch.zeros_like(x_T), x_T, inversion.sigmas,
                                              conditioning["target"], conditioning["empty"], opts.cfg, opts.seed,
                                              callback=host.step_callback(opts.steps))
            seconds[name] = time.perf_counter() - start
            outputs[name] = latent_to_frames(latent.float()).clamp(0, 1)
            progress.end_run(opts.steps)
    finally:
        host.report_progress_to(None)

    progress.phase("measuring warp error and flicker under the exact flow; writing the video, strip and figures ...")
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
