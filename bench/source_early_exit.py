"""The live source pass ends its UNet call after the last feature the edit reads (issue 25 item 1): what it saves.

    COMFYUI_PATH=/path/to/ComfyUI python bench/source_early_exit.py [--frames 2] [--size 64] [--steps 10]
        [--threads 1] [--repeats 3] [--backends sub_quad pytorch] [--methods pnp-tokenflow ...]
    COMFYUI_PATH=... python bench/source_early_exit.py --flops sd15:64 sdxl:128     (FLOP table only)

The engine ends each step's source pass right after the last feature a method on the model reads at that step
(``passes.Step.source_end``, through ``host.set_unet_call_end``); ``stack.with_full_source_pass`` is the same
edit with the whole UNet run, the reference here. On an SD1.5-layout UNet with its 4 levels (channel_mult
1, 2, 4, 4, two ResBlocks per level, attention on the first three levels, random weights, 64 channels, 8-channel
heads) at a ``--size`` latent, for each host attention backend (sub-quadratic, ComfyUI's CPU default; torch
SDPA, its GPU default), interleaved (``_timing``: A B C, C B A, ...; best and median):
  * plain CFG sampling, the edit with the early end, and the edit with the whole source pass (same frames, steps,
    cfg), as ratios to plain (issue 25 goal: per-frame PnP <= 1.3x plain with SDPA at a 64x64 latent), in wall
    time and in the process's CPU time (with one torch thread, the steadier figure on a loaded machine);
  * the edited latents with and without the early end: bit-identical (those of the first round compared).
``--flops``: the FLOPs of one call of the real SD1.5 / SDXL UNet on the meta device, and the share of a source
call each injection preset's early end saves.
"""
import argparse
import time

import _edits
import _timing
import _tve

_tve.real_host()

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from tve.engine.flatten import apply_flatten  # noqa: E402
from tve.engine.injection import apply_feature_injection  # noqa: E402
from tve.engine.stack import with_full_source_pass  # noqa: E402
from tve.engine.tokenflow import apply_tokenflow  # noqa: E402

# SD1.5's UNet layout (comfy's model detection of an SD1.5 checkpoint), 64 channels instead of 320
SD15_LAYOUT = dict(model_channels=64, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                   transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                   transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
ATTN_END, CONV_END = 0.5, 0.8          # Apply Feature Injection (TVE)'s defaults


# ---------------------------------------------------------------------------------------------- real UNets
UNETS = {   # comfy's UNetModel configs of SD1.5 and SDXL (as its model detection makes them), for shapes only
    "sd15": dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_resblock=False,
                 use_temporal_attention=False),
    "sdxl": dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
                 num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_resblock=False,
                 use_temporal_attention=False),
}


class _Unet:
    """What the pack's block enumeration reads of a MODEL (``get_model_object("diffusion_model")``)."""

    def __init__(self, unet):
        self.unet = unet

    def get_model_object(self, name):
        return self.unet


def flop_table(family: str, size: int) -> None:
    """FLOPs of one UNet call of a real SD1.5 / SDXL UNet on the meta device (shapes only, nothing computed): the
    share spent before each output block and after each output block's ResBlock, and the share of a source call the
    engine's early end saves for each injection preset, while q/k injection runs (attention and conv features read)
    and after it (conv features only): the call ends right after ``SourceReads.last_point`` (a ResBlock branch, or
    a self-attention input: then before that block's attn1)."""
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel
    from tve.engine.injection import injection_targets
    from tve.engine.methods import SourceReads, resblock_point, tokens_point
    unet = UNetModel(**UNETS[family], dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
    counter = FlopCounterMode(display=False)
    before, at_point = {}, {}

    def mark(h, hsp, transformer_options):
        before[transformer_options["block"][1]] = counter.get_total_flops()
        return h, hsp

    def at(point):
        return lambda *args: at_point.__setitem__(point, counter.get_total_flops())

    handles = []
    for b, block in enumerate(unet.output_blocks):
        for layer in block:
            if isinstance(layer, ResBlock):
                handles.append(layer.register_forward_hook(at(resblock_point(b))))
            if isinstance(layer, attention.SpatialTransformer):
                for j, tb in enumerate(layer.transformer_blocks):
                    handles.append(tb.attn1.register_forward_pre_hook(at(tokens_point(("output", b, j)))))
    options = {"patches": {"output_block_patch": [mark]},
               "optimized_attention_override": lambda default, *a, **k: attention.attention_pytorch(*a, **k)}
    x = torch.empty(1, 4, size, size, device="meta", dtype=torch.float16)
    extra = {"y": torch.empty(1, 2816, device="meta", dtype=torch.float16)} if family == "sdxl" else {}
    context = torch.empty(1, 77, UNETS[family]["context_dim"], device="meta", dtype=torch.float16)
    with counter:
        unet(x, torch.empty(1, device="meta"), context=context, transformer_options=options, **extra)
    for h in handles:
        h.remove()
    total = counter.get_total_flops()
    blocks = len(unet.output_blocks)
    print(f"## {family.upper()} UNet, {size}x{size} latent, batch 1: {total / 1e9:.0f} GFLOP per call (meta device, "
          f"torch FlopCounterMode); share of a call spent before output block i / after its ResBlock:")
    print("  " + ", ".join(f"{i}: {before[i] / total:.3f}/{at_point[resblock_point(i)] / total:.3f}"
                           for i in range(blocks)))
    model = _Unet(unet)
    for preset in ("tokenflow", "flatten"):
        attn, conv = injection_targets(model, preset)
        for phase, tokens in (("attention + conv injection", frozenset(b.key for b in attn)),
                              ("conv injection only", frozenset())):
            last = SourceReads(tokens, frozenset(conv)).last_point()
            where = (f"output block {last[1]}'s ResBlock" if last[2] == -1 else
                     f"output block {last[1]}'s transformer {last[2]} self-attention input")
            print(f"  {preset} preset, {phase}: the source call ends after {where}: {1 - at_point[last] / total:.1%} "
                  "of it saved", flush=True)


def edit_models(model, inversion, size: int, frames: int) -> dict:
    """The edits the bench can time, each a function of the (attention-backend) model."""
    def flatten_model(m):
        from tve.flow.estimate import FlowField
        from tve.flow.trajectories import build_trajectories
        from tve.tools.video_world import render_clip
        clip = render_clip(frames, size * 8, size * 8, seed=0, sprites=1)
        flow = FlowField(clip.flow_forward, clip.flow_backward, clip.occlusion_forward, "ground truth")
        return apply_flatten(m, build_trajectories(flow, (size, size), seed=0), "highest resolution", "dense_output")

    return {
        "pnp-tokenflow": lambda m: apply_feature_injection(m, inversion, ATTN_END, CONV_END, "tokenflow",
                                                           "sigma-matched"),
        "pnp-flatten": lambda m: apply_feature_injection(m, inversion, ATTN_END, CONV_END, "flatten",
                                                         "sigma-matched"),
        "flatten": lambda m: apply_feature_injection(flatten_model(m), inversion, ATTN_END, CONV_END, "flatten",
                                                     "sigma-matched"),
        "tokenflow": lambda m: apply_tokenflow(m, inversion, 4, 0, "paper", ATTN_END, CONV_END),
    }


LABELS = {"pnp-tokenflow": "per-frame PnP (TokenFlow preset)", "pnp-flatten": "per-frame PnP (FLATTEN preset)",
          "flatten": "FLATTEN + PnP (FLATTEN preset)", "tokenflow": "TokenFlow"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--size", type=int, default=64, help="latent height and width")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=["pnp-tokenflow"], choices=sorted(LABELS))
    ap.add_argument("--flops", nargs="*", metavar="FAMILY:SIZE", help="only the FLOP table of real UNets on "
                    "the meta device (e.g. sd15:64 sdxl:128); nothing sampled")
    _timing.add_arguments(ap, repeats=3, backends=("pytorch", "sub_quad"))
    opts = ap.parse_args()
    _timing.pin_threads(opts.threads)
    if opts.flops is not None:
        for spec in opts.flops or ["sd15:64", "sdxl:128"]:
            family, size = spec.split(":")
            flop_table(family, int(size))
        return
    with torch.inference_mode():                                    # as ComfyUI runs its nodes
        run(opts)


def run(opts) -> None:
    from tve.tests.hosts import make_tiny_model
    flat = make_tiny_model("sd15", **SD15_LAYOUT)
    model, x_T, inversion = _edits.inverted_video(opts.frames, opts.size, opts.steps, model=flat)
    edits = edit_models(model, inversion, opts.size, opts.frames)
    _timing.header(f"source pass ending after the last feature read vs the whole source pass, {opts.frames} frames, "
                   f"{opts.size}x{opts.size} latent, {opts.steps} steps, cfg 7.5, attn_end {ATTN_END}, conv_end "
                   f"{CONV_END}, SD1.5-layout 4-level UNet (64 channels, random weights), CPU")
    for backend in opts.backends:
        plain = _timing.with_attention(model, backend)
        label = _timing.backend_label(backend)
        for name in opts.methods:
            ended = edits[name](plain)
            whole = with_full_source_pass(ended)
            models = {"plain": plain, "ended": ended, "whole": whole}
            latents, cpu = {}, {k: [] for k in models}

            def timed(k: str, m) -> None:
                start = time.process_time()
                latents.setdefault(k, _edit(m, x_T, inversion.sigmas))
                cpu[k].append(time.process_time() - start)

            wall = _timing.interleaved({k: (lambda k=k, m=m: timed(k, m)) for k, m in models.items()}, opts.repeats,
                                       warmup=False)
            same = torch.equal(latents["ended"], latents["whole"])
            print(f"## {LABELS[name]} [{label}]: edited latents {'bit-identical' if same else 'DIFFERENT'} with "
                  "and without the early end", flush=True)
            for clock, times in (("wall", wall), ("CPU", {k: _timing.Times(v) for k, v in cpu.items()})):
                print(f"  {clock} time:", flush=True)
                print("    " + _timing.ratio_line(times, "ended", "plain", "edit, source pass ended early / plain CFG"))
                print("    " + _timing.ratio_line(times, "whole", "plain", "edit, whole source pass / plain CFG"))
                print("    " + _timing.ratio_line(times, "ended", "whole", "edit ended early / whole"), flush=True)


def _edit(model, x_T, sigmas) -> torch.Tensor:
    import comfy.sample
    import comfy.samplers
    from tve.tests.hosts import make_conditioning
    return comfy.sample.sample_custom(model, torch.zeros_like(x_T), 7.5, comfy.samplers.sampler_object("euler"),
                                      sigmas, make_conditioning("sd15", 2), make_conditioning("sd15", 3), x_T,
                                      disable_pbar=True)


if __name__ == "__main__":
    main()
