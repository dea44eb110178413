"""EI²'s claims on the pack's trained test model and held-out procedural clips (real host), in one run.

    COMFYUI_PATH=/path/to/ComfyUI python bench/one_shot.py [--clips 2] [--frames 6] [--size 64] [--tune-steps 20]

Per held-out clip, the model with fine-coarse frame attention (FFAM) is tuned twice on the clip (source embedding,
same steps, learning rate and seed): with Tune-A-Video's ``layernorm`` temporal attention and with EI²'s ``stam``.

- Covariate shift (EI²'s motivation for STAM): every transformer block's hidden state after its temporal attention, tuned vs the
  untuned model, on the same noisy copies of the clip under the target embedding: mean shift
  ``‖μ_tuned − μ_base‖ / ‖σ_base‖`` and variance shift ``mean_c |var_tuned / var_base − 1|`` of the per-channel
  statistics, averaged over blocks and draws. The paper's claim: ``stam`` shifts less.
- Edit quality (Tune-A-Video's recipe: DDIM inversion with the model, then CFG sampling with ``target``), for the
  untuned per-frame model, untuned FFAM, ``layernorm`` tuning and ``stam`` tuning: latent warp error and fidelity
  error as in bench/consistency.py, and edit strength (how far the low-passed output moved from the source towards
  the target's recolour: 1 = all the way, 0 = not at all).
- Tuning: the clip's diffusion loss after tuning vs before (fixed draws); seconds per step; peak resident memory of
  a 2-step tuning run in a fresh process (CPU), ``stam`` vs ``layernorm`` and with vs without gradient
  checkpointing.
"""
import argparse
import time

import _tve

_tve.real_host()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _edits import peak_rss_rise  # noqa: E402
from consistency import fidelity_error, latent_flow, latent_warp_error, procedural_clip  # noqa: E402
from tve.engine import host
from tve.engine.cross_frame import apply_cross_frame
from tve.engine.inversion import invert
from tve.engine.one_shot import evaluate_loss, tune
from tve.engine.temporal_adapter import apply_adapter
from tve.tests.trained_model import load_trained_model, trained_conditioning  # noqa: E402
from tve.tools.train_test_model import recolour  # noqa: E402
from tve.tools.video_world import LATENT_SCALE, frames_to_latent, latent_to_frames  # noqa: E402

VARIANTS = ["untuned per-frame", "untuned FFAM", "layernorm tuned", "stam tuned"]


def with_ffam(model):
    """EI²'s fine-coarse frame attention, through the node function the workflow's Apply Cross-Frame node calls."""
    return apply_cross_frame(model, "fine_coarse", 8, 0, False, 2, 0, "all", 0.0, 1.0)


def block_features(model, samples, draws):
    """Per draw, per block: the hidden state after the temporal attention, (F, T, C) float32."""
    seen = []

    def record(x, extra_options):
        seen.append(x.detach().float().clone())
        return x

    m = model.clone()
    host.set_middle_patch(m, record)
    cond = trained_conditioning("target")

    def loop(denoise, x0):
        with torch.no_grad():
            for t, noise in draws:
                sigma = host.training_sigmas(m, t).float()
                denoise(host.noise_scaling(m, sigma, noise.to(x0), x0), sigma)

    host.train_on_clip(m, cond, samples, loop)
    return seen


def covariate_shift(base_features, tuned_features):
    mean_shift, var_shift = [], []
    for b, t in zip(base_features, tuned_features):
        b, t = b.flatten(0, 1), t.flatten(0, 1)                                   # (F·T, C)
        mu_b, mu_t, var_b, var_t = b.mean(0), t.mean(0), b.var(0), t.var(0)
        mean_shift.append(float((mu_t - mu_b).norm() / var_b.sqrt().norm()))
        var_shift.append(float((var_t / var_b.clamp_min(1e-12) - 1).abs().mean()))
    return sum(mean_shift) / len(mean_shift), sum(var_shift) / len(var_shift)


def low_pass(frames):                                    # (F, H, W, 3) → over 4×4 cells (one stripe period)
    return F.avg_pool2d(frames.permute(0, 3, 1, 2).float(), 4 * LATENT_SCALE, ceil_mode=True)


def edit_strength(latents, source_frames):
    source, target = low_pass(source_frames), low_pass(recolour(source_frames.float()))
    out = low_pass(latent_to_frames(latents.float()))
    return float(((out - source) * (target - source)).sum() / ((target - source) ** 2).sum())


def edit(model, raw, steps, cfg, seed):
    import comfy.sample
    import comfy.samplers
    x_T, inversion = invert(model, raw, trained_conditioning("source"), steps, "ddim_uniform")
    return comfy.sample.sample_custom(model, torch.zeros_like(x_T), cfg, comfy.samplers.sampler_object("euler"),
                                      inversion.sigmas, trained_conditioning("target"),
                                      trained_conditioning("empty"), x_T, disable_pbar=True, seed=seed)


def run_clip(frames_rgb, flow, opts) -> dict:
    base = load_trained_model()
    ffam = with_ffam(base)
    raw = frames_to_latent(frames_rgb)
    source = trained_conditioning("source")
    g = torch.Generator().manual_seed(opts.seed + 1)
    draws = [(torch.randint(0, host.num_timesteps(base), (1,), generator=g), torch.randn(raw.shape, generator=g))
             for _ in range(opts.shift_draws)]
    models, rows = {"untuned per-frame": base, "untuned FFAM": ffam}, {}
    for kind in ("layernorm", "stam"):
        start = time.perf_counter()
        adapter = tune(ffam, raw, source, opts.tune_steps, opts.lr, opts.seed, kind)
        seconds = (time.perf_counter() - start) / opts.tune_steps
        models[f"{kind} tuned"] = apply_adapter(ffam, adapter)
        rows[f"{kind} tuned"] = {"step_s": seconds, "loss": evaluate_loss(models[f"{kind} tuned"], raw, source,
                                                                          opts.shift_draws, opts.seed + 2)}
    rows["untuned FFAM"] = {"loss": evaluate_loss(ffam, raw, source, opts.shift_draws, opts.seed + 2)}
    base_features = block_features(ffam, raw, draws)
    for kind in ("layernorm", "stam"):
        rows[f"{kind} tuned"]["mean_shift"], rows[f"{kind} tuned"]["var_shift"] = covariate_shift(
            base_features, block_features(models[f"{kind} tuned"], raw, draws))
    forward, occluded = latent_flow(flow)
    for name in VARIANTS:
        out = edit(models[name], raw, opts.edit_steps, opts.cfg, opts.seed)
        rows.setdefault(name, {}).update(warp=latent_warp_error(out, forward, occluded),
                                         fidelity=fidelity_error(out, frames_rgb),
                                         strength=edit_strength(out, frames_rgb))
    return rows


def memory_probe(opts) -> None:
    """(Child process) print the peak RSS rise of a 2-step tuning run of one configuration."""
    frames_rgb, _ = procedural_clip(10, opts.frames, opts.size)
    ffam = with_ffam(load_trained_model())
    raw, source = frames_to_latent(frames_rgb), trained_conditioning("source")
    kind, checkpointing = opts.memory_probe.split(",")
    print(peak_rss_rise(lambda: tune(ffam, raw, source, 2, opts.lr, opts.seed, kind,
                                     gradient_checkpointing=checkpointing == "on")))


def tuning_memory(opts) -> dict:
    """Peak resident memory a 2-step tuning run adds, per configuration, each in a fresh process whose malloc
    returns every block of 64 KiB or more to the OS on free (so the resident set tracks the live tensors)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    peaks = {}
    for kind in ("layernorm", "stam"):
        for checkpointing in ("on", "off"):
            out = subprocess.run([sys.executable, __file__, "--memory-probe", f"{kind},{checkpointing}",
                                  "--frames", str(opts.frames), "--size", str(opts.size), "--lr", str(opts.lr)],
                                 env=env, capture_output=True, text=True, check=True).stdout
            peaks[(kind, checkpointing == "on")] = int(out.strip().splitlines()[-1])
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--size", type=int, default=64, help="frame size in pixels (latent = size / 8)")
    ap.add_argument("--tune-steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--edit-steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--shift-draws", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    opts = ap.parse_args()
    torch.manual_seed(opts.seed)
    if opts.memory_probe:
        return memory_probe(opts)
    clips = [procedural_clip(10 + i, opts.frames, opts.size) for i in range(opts.clips)]
    totals: dict = {}
    for frames_rgb, flow in clips:
        for name, row in run_clip(frames_rgb, flow, opts).items():
            for key, value in row.items():
                totals.setdefault(name, {}).setdefault(key, []).append(value)
    mean = {name: {k: sum(v) / len(v) for k, v in row.items()} for name, row in totals.items()}
    peaks = tuning_memory(opts)
    ln, st, base = mean["layernorm tuned"], mean["stam tuned"], mean["untuned per-frame"]
    print(f"# {opts.clips} held-out clip(s), {opts.frames} frames, {opts.size}x{opts.size} px, FFAM (fine_coarse 2) "
          f"for the tuned models; {opts.tune_steps} tuning steps at lr {opts.lr}, {opts.edit_steps} edit steps, "
          f"cfg {opts.cfg}; trained test model, CPU")
    print(f"{st['mean_shift'] / ln['mean_shift']:.3f}x mean shift stam / layernorm (claim < 1)  | stam "
          f"{st['mean_shift']:.4f}, layernorm {ln['mean_shift']:.4f}")
    print(f"{st['var_shift'] / ln['var_shift']:.3f}x variance shift stam / layernorm (claim < 1)  | stam "
          f"{st['var_shift']:.4f}, layernorm {ln['var_shift']:.4f}")
    for name in VARIANTS:
        row = mean[name]
        print(f"{row['warp'] / base['warp']:.3f}x warp  {row['fidelity'] / base['fidelity']:.3f}x fidelity error  "
              f"{row['strength'] / base['strength']:.3f}x edit strength / untuned per-frame  | {name}: warp "
              f"{row['warp']:.4f}, fidelity {row['fidelity']:.5f}, strength {row['strength']:.3f}")
    for name in ("layernorm tuned", "stam tuned"):
        print(f"{mean[name]['loss'] / mean['untuned FFAM']['loss']:.3f}x the clip's diffusion loss tuned / untuned "
              f"(same {opts.shift_draws} draws)  | {name}: {mean[name]['loss']:.4f} vs "
              f"{mean['untuned FFAM']['loss']:.4f}")
    print(f"{st['step_s'] / ln['step_s']:.3f}x time per tuning step stam / layernorm  | stam {st['step_s']:.3f} s, "
          f"layernorm {ln['step_s']:.3f} s (gradient checkpointing)")
    for kind in ("layernorm", "stam"):
        with_ckpt, without = peaks[(kind, True)], peaks[(kind, False)]
        print(f"{with_ckpt / max(without, 1):.3f}x peak memory with / without gradient checkpointing  | {kind}: "
              f"{with_ckpt / 2 ** 20:.0f} MiB vs {without / 2 ** 20:.0f} MiB")
    print(f"{peaks[('stam', True)] / max(peaks[('layernorm', True)], 1):.3f}x peak memory stam / layernorm")


if __name__ == "__main__":
    main()
