"""Where does per-frame variance enter an edit? The trained 256 px test model on one held-out clip (real host).

    COMFYUI_PATH=/path/to/ComfyUI python bench/diagnose.py [--frames 8] [--steps 20] [--testbed test_model_256]

Edits one held-out procedural clip (ground-truth flow) three ways from the same inversion, as
``bench/consistency.py`` does: per-frame PnP, TokenFlow, FLATTEN (each with PnP injection). Forward hooks on the
UNet's modules (removed afterwards) read every call of every step; the pass of a call (source / keyframes / edit)
comes from the sampling run the TVE state puts in ``transformer_options``. Printed, ratio first:

1. **Self-attention warp error per block**: each self-attention block's output (after ``to_out``) as a
   ``(F, C, h, w)`` grid, frame t+1 warped into frame t with the source flow pooled to that grid; relative warp error
   ``sum_visible |warp(f_t+1) - f_t|^2 / sum_visible |f_t|^2``, mean over steps, for the edit pass's conditional
   rows and for the source pass. Edit / source > 1 is variance the edit adds at that block.
2. **Keyframe agreement per step**: the stripes of the step's predicted clean latents ``x0 = x - σ ε`` (the grey the
   source does not explain, band-passed at the stripe period): correlation between consecutive frames after
   carrying the later one into the earlier along the ground-truth flow (1: the same stripes stuck to the content;
   ~0: unrelated), over TokenFlow's keyframes of the step (their rows of the keyframe pass) and, for every method,
   over all frames of the edit pass; and the circular spread (degrees) of the fitted stripe angles.
3. **Attention vs ResBlock share of the change**: each ResBlock's residual branch (output minus skip) and each
   spatial transformer's (output minus input), edit pass minus source pass at the same step; the share of the
   summed squared change that the transformers carry, and each kind's warp error of the edit branch relative to
   the source branch.
4. **Where the output flickers**: the final output's latent warp error (``bench/consistency.py``'s) and its split
   (``tools/edit_measures.warp_error_parts``) into what the source explains per frame (the recolour), the stripe
   band of the rest, and the rest outside the band.
"""
import argparse
import math
from collections import defaultdict

import _tve

_tve.real_host()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tve.flow.warp import backward_warp  # noqa: E402
from tve.engine.run import Pass
from tve.engine.passes import current_run
from tve.tests.trained_model import load_trained_model, trained_conditioning  # noqa: E402
from tve.tools.train_test_model import HELD_OUT_SEED, TESTBEDS, fit_stripes  # noqa: E402
from tve.tools.edit_measures import (latent_flow, latent_warp_error, unexplained_grey, warp_error_parts,  # noqa: E402
                                     without_band)
from tve.tools.video_world import LATENT_SCALE, frames_to_latent, render_clip  # noqa: E402

METHODS = ("per-frame PnP", "TokenFlow", "FLATTEN")


def grid_flow(forward: torch.Tensor, occlusion: torch.Tensor, size: int, cells: int):
    """Pixel flow ``(F-1, 2, H, W)`` -> flow on a ``cells x cells`` grid in grid units, and its occluded cells."""
    factor = size // cells
    return (F.avg_pool2d(forward, factor) / factor,
            F.max_pool2d(occlusion.float()[:, None], factor)[:, 0] > 0)


def relative_warp_error(grid: torch.Tensor, flows: dict) -> float:
    """``(F, C, h, w)`` -> ``sum_visible |warp(f_t+1) - f_t|² / sum_visible |f_t|²`` over all pairs."""
    flow, occluded = flows[grid.shape[-1]]
    warped, valid = backward_warp(grid[1:].float(), flow)
    visible = (valid & ~occluded).float()[:, None]
    return float((((warped - grid[:-1]) ** 2) * visible).sum() / ((grid[:-1] ** 2) * visible).sum().clamp(min=1e-12))


def tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, T, C)`` with square token grids -> ``(B, C, h, w)``."""
    side = math.isqrt(tokens.shape[1])
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], side, side)


def stripe_agreement(raw: torch.Tensor, source_frames: torch.Tensor, ids: list[int], flows: dict,
                     period: float) -> float:
    """Mean correlation of the stripe-band residuals (``unexplained_grey`` minus ``without_band``) of consecutive
    frames in ``ids`` (global ids, ascending), the later one carried into the earlier along the ground-truth flow,
    over the cells visible all the way: 1 = the same stripes stuck to the content, ~0 = unrelated stripes."""
    residual = unexplained_grey(raw.float(), source_frames[ids])
    band = (residual - without_band(residual, period)).float()[:, None]  # (F', 1, h, w)
    flow, occluded = flows[raw.shape[-1]]
    values = []
    for (a, fa), (b, fb) in zip(enumerate(ids), list(enumerate(ids))[1:]):
        carried, seen = band[b:b + 1], torch.ones_like(band[b:b + 1])
        for k in range(fb - 1, fa - 1, -1):  # frame k+1 -> frame k
            both, valid = backward_warp(torch.cat([carried, seen], 1), flow[k:k + 1])
            carried, seen = both[:, :1], both[:, 1:] * (valid & ~occluded[k:k + 1]).float()[:, None]
        mask = seen[0, 0] > 0.999
        x, y = band[a, 0][mask], carried[0, 0][mask]
        values.append(float((x * y).sum() / (x.norm() * y.norm()).clamp(min=1e-12)))
    return sum(values) / len(values) if values else float("nan")


def angle_spread(raw: torch.Tensor, source_frames: torch.Tensor, period: float) -> float:
    """Circular spread (degrees) of the stripe angles (mod 180°) fitted to what the source does not explain of the
    raw latents' grey (``unexplained_grey``, as edit strength measures it); ``period`` in cells."""
    residual = unexplained_grey(raw.float(), source_frames)  # (F, h, w)
    angle, _, _ = fit_stripes(residual[..., None].expand(-1, -1, -1, 3), angles=90, period=period)
    resultant = torch.complex(torch.cos(2 * angle), torch.sin(2 * angle)).mean().abs().clamp(1e-9, 1.0)
    return abs(math.degrees(math.sqrt(-2 * math.log(float(resultant))) / 2))


class Recorder:
    """Forward hooks on one UNet; per step, the source pass's outputs wait for the edit pass of the same step."""

    def __init__(self, unet: torch.nn.Module, sampling, flows: dict, frames: torch.Tensor, period: float):
        from comfy.ldm.modules.attention import SpatialTransformer
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock
        self.sampling, self.flows, self.frames, self.period = sampling, flows, frames, period
        self.call = None                                   # (pass, cond rows slice or None, run)
        self.source: dict = {}                             # module name -> source pass output of this step
        self.attn_warp = defaultdict(lambda: {"edit": [], "source": []})
        self.change = {"attention": 0.0, "resblock": 0.0}
        self.branch_warp = defaultdict(lambda: {"edit": [], "source": []})
        self.spread = {"keyframes": [], "all frames": []}
        self.agreement = {"keyframes": [], "all frames": []}
        self.handles = [unet.register_forward_pre_hook(self.on_call, with_kwargs=True),
                        unet.register_forward_hook(self.on_output, with_kwargs=True)]
        for name, module in unet.named_modules():
            if name.endswith("attn1.to_out"):
                self.handles.append(module.register_forward_hook(self.attn_hook(name)))
            elif isinstance(module, (ResBlock, SpatialTransformer)):
                kind = "resblock" if isinstance(module, ResBlock) else "attention"
                self.handles.append(module.register_forward_hook(self.branch_hook(name, kind)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def on_call(self, module, args, kwargs):
        options = kwargs.get("transformer_options", {})
        run = current_run(options)
        name = run.pass_ if run is not None else None
        rows = args[0].shape[0]
        chunks = options.get("cond_or_uncond", [0])
        per = rows // len(chunks)
        cond = slice(chunks.index(0) * per, (chunks.index(0) + 1) * per) if 0 in chunks else None
        if name == Pass.SOURCE:
            self.source = {}
            cond = slice(0, rows)
        ids = run.pass_frame_ids if run is not None and run.pass_frame_ids is not None else range(per)
        self.call = (name, cond, args[0], args[1], list(ids))

    def on_output(self, module, args, kwargs, eps):
        name, cond, x, t, ids = self.call
        if name not in (Pass.KEYFRAMES, Pass.EDIT) or cond is None:
            return
        sigma = self.sampling.sigma(t[cond]).reshape(-1, 1, 1, 1)
        x0 = x[cond] * (sigma ** 2 + 1).sqrt() - sigma * eps[cond]    # model-space clean latent, EPS prediction
        spread = angle_spread(x0 / 0.18215, self.frames[ids], self.period)  # SD1.5 latent scale back to raw
        which = "keyframes" if name == Pass.KEYFRAMES else "all frames"
        self.spread[which].append(spread)
        self.agreement[which].append(stripe_agreement(x0 / 0.18215, self.frames, ids, self.flows, self.period))

    def _rows(self, output: torch.Tensor):
        name, cond = self.call[:2]
        if name not in (Pass.SOURCE, Pass.EDIT) or cond is None:
            return None, None
        return name, output[cond].detach().float()

    def attn_hook(self, key: str):
        def hook(module, args, output):
            name, rows = self._rows(output)
            if name is None:
                return
            grid = tokens_to_grid(rows)
            self.attn_warp[key]["source" if name == Pass.SOURCE else "edit"].append(
                relative_warp_error(grid, self.flows))
        return hook

    def branch_hook(self, key: str, kind: str):
        def hook(module, args, output):
            name, rows = self._rows(output)
            if name is None:
                return
            x = args[0][self.call[1]].detach().float()
            skip = module.skip_connection(x) if kind == "resblock" else x
            branch = rows - skip.float()                                     # (F, C, h, w)
            side = "source" if name == Pass.SOURCE else "edit"
            self.branch_warp[kind][side].append(relative_warp_error(branch, self.flows))
            if name == Pass.SOURCE:
                self.source[key] = branch
            elif key in self.source and self.source[key].shape == branch.shape:
                self.change[kind] += float(((branch - self.source[key]) ** 2).sum())
        return hook


def edit_models(model, inversion, trajectories, seed: int, interval: int) -> dict:
    from tve.engine.flatten import apply_flatten
    from tve.engine.injection import apply_feature_injection
    from tve.engine.tokenflow import apply_tokenflow
    flatten = apply_flatten(model, trajectories, "highest resolution", "dense_output")
    return {
        "per-frame PnP": apply_feature_injection(model, inversion, 0.5, 0.8, "tokenflow", "sigma-matched"),
        "TokenFlow": apply_tokenflow(model, inversion, interval, seed, "paper", 0.5, 0.8),
        "FLATTEN": apply_feature_injection(flatten, inversion, 0.5, 0.8, "flatten", "sigma-matched"),
    }


def mean(values: list) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    import comfy.sample
    import comfy.samplers
    from tve.flow.estimate import FlowField
    from tve.flow.trajectories import build_trajectories
    from tve.engine.inversion import invert

    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", choices=sorted(TESTBEDS), default="test_model_256")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--interval", type=int, default=8, help="TokenFlow keyframe interval (bench/consistency: 8)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--clip", type=int, default=0, help="held-out clip index")
    ap.add_argument("--seed", type=int, default=0)
    opts = ap.parse_args()
    testbed = TESTBEDS[opts.testbed]
    size = testbed.frame_size
    clip = render_clip(opts.frames, size, size, seed=HELD_OUT_SEED + opts.clip, sprites=2)
    flow = FlowField(clip.flow_forward, clip.flow_backward, clip.occlusion_forward, "ground truth")
    flows = {cells: grid_flow(clip.flow_forward, clip.occlusion_forward, size, cells)
             for cells in (size // LATENT_SCALE >> level for level in range(4))}
    model = load_trained_model(opts.testbed)
    cond = lambda name: trained_conditioning(name, opts.testbed)  # noqa: E731
    raw = frames_to_latent(clip.frames)
    x_T, inversion = invert(model, raw, cond("source"), opts.steps, "ddim_uniform")
    trajectories = build_trajectories(flow, tuple(raw.shape[-2:]), seed=opts.seed)
    cell_flow, occluded = latent_flow(clip.flow_forward, clip.occlusion_forward)
    unet = model.model.diffusion_model
    sampling = model.get_model_object("model_sampling")
    print(f"# {opts.testbed}: held-out clip {opts.clip}, {opts.frames} frames of {size}x{size}, {opts.steps} steps, "
          f"cfg {opts.cfg}, ground-truth flow")
    period = testbed.stripe_period / LATENT_SCALE
    print(f"# source latents: stripe-angle spread over frames {angle_spread(raw, clip.frames, period):.1f} deg")
    for method, patched in edit_models(model, inversion, trajectories, opts.seed, opts.interval).items():
        recorder = Recorder(unet, sampling, flows, clip.frames, period)
        try:
            out = comfy.sample.sample_custom(patched, torch.zeros_like(x_T), opts.cfg,
                                             comfy.samplers.sampler_object("euler"), inversion.sigmas,
                                             cond("target"), cond("empty"), x_T, disable_pbar=True, seed=opts.seed)
        finally:
            recorder.remove()
        print(f"## {method}")
        for key, warp in recorder.attn_warp.items():
            block = key.replace(".transformer_blocks.0.attn1.to_out", "")
            ratio = mean(warp["edit"]) / mean(warp["source"])
            print(f"{ratio:.2f}x self-attention warp error, edit / source | {block}: edit {mean(warp['edit']):.3f}, "
                  f"source {mean(warp['source']):.3f}")
        for which in ("keyframes", "all frames"):
            spread, agreement = recorder.spread[which], recorder.agreement[which]
            if spread:
                print(f"{mean(agreement):.2f} stripe correlation between consecutive {which} of a step, carried "
                      f"along the flow (mean over steps; last step {agreement[-1]:.2f}); stripe-angle spread "
                      f"{mean(spread):.1f} deg (last step {spread[-1]:.1f})")
        total = sum(recorder.change.values())
        for kind in ("attention", "resblock"):
            warp = recorder.branch_warp[kind]
            print(f"{recorder.change[kind] / total:.2f} of the squared change (edit - source) is in the {kind} "
                  f"branches; their warp error edit / source {mean(warp['edit']) / mean(warp['source']):.2f}x")
        parts = warp_error_parts(out, clip.frames, period, cell_flow, occluded)
        print(f"output warp error {latent_warp_error(out, cell_flow, occluded):.3f}, by part: what the source "
              f"explains {parts['explained']:.3f}, stripe band {parts['stripes']:.3f}, the rest {parts['rest']:.3f}")


if __name__ == "__main__":
    main()
