"""Prototype (issue 25): end the live SOURCE pass's UNet call after the last block whose features the edit reads.

    COMFYUI_PATH=/path/to/ComfyUI python bench/source_early_exit.py [--frames 8] [--steps 10] [--threads 1]

The mechanism, on host patch points only (no UNet forward of ours, nothing of comfy replaced):
  * an ``output_block_patch`` (called by the UNet before each output block, with ``transformer_options["block"]``
    = ("output", id)) raises the private ``SourceDone`` when the pass now running is SOURCE and no block from
    ``id`` on is read at this step;
  * a ``DIFFUSION_MODEL`` wrapper (keyed, around ``UNetModel._forward``) catches exactly ``SourceDone`` and
    returns zeros of the UNet output's shape, which the source pass never reads.
The exception unwinds only ``UNetModel._forward`` between two output blocks (no layer is mid-forward, so no weight
cast, offload stream or hook is half done); every host frame outside the diffusion model sees a normal return.

What this script shows, per method, on the trained 256 px test model (SD1.5's block layout, 8 output blocks):
  1. the source features the edit reads (``SamplingRun.source``: tokens and ResBlock branches as the edit pass of
     each step finds them) are bit-identical with and without the early exit, and so is the edited latent;
  2. the number of source calls that exited, and at which block;
  3. the time of the source pass's UNet calls and of the whole edit, interleaved with / without (best, median),
     for each attention backend asked for;
  4. host state afterwards: a plain sampling of the base model gives the bit-identical result it gave before,
     inference mode and the model's wrappers/patches are as they were.
"""
import argparse
import contextlib
import time

import _timing
import _tve

_tve.real_host()

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402

from tve.flow.estimate import FlowField  # noqa: E402
from tve.flow.trajectories import build_trajectories  # noqa: E402
from tve.engine import host  # noqa: E402
from tve.engine.flatten import apply_flatten  # noqa: E402
from tve.engine.injection import apply_feature_injection  # noqa: E402
from tve.engine.inversion import invert  # noqa: E402
from tve.engine.run import Pass  # noqa: E402
from tve.engine.tokenflow import apply_tokenflow  # noqa: E402
from tve.tests.trained_model import load_trained_model, trained_conditioning  # noqa: E402
from tve.tools.train_test_model import HELD_OUT_SEED  # noqa: E402
from tve.tools.video_world import frames_to_latent, render_clip  # noqa: E402

EXIT_KEY = "tve_source_exit"


class SourceDone(Exception):
    """Private: the SOURCE pass has computed every feature this step reads."""


def last_read_output_block(run) -> int | None:
    """The last output block whose source features some method reads at ``run.step`` (the stack's
    ``source_reads``: self-attention inputs and ResBlock branches); -1 when nothing of the decoder is read, None
    when nothing at all is (then the step runs no source pass)."""
    reads = run.stack.source_reads(run.step, run.steps)
    if not reads:
        return None
    return max([key[1] for key in reads.tokens if key[0] == "output"] + list(reads.resblocks), default=-1)


class EarlyExit:
    """The patch and the wrapper, with counters."""

    def __init__(self):
        self.exits: dict[int, int] = {}

    def __deepcopy__(self, memo: dict) -> "EarlyExit":
        return self                               # ModelPatcher.clone deep-copies model_options

    def patch(self, h, hsp, transformer_options):
        run = transformer_options.get(host.RUN_KEY)
        if run is not None and run.pass_ is Pass.SOURCE:
            last = last_read_output_block(run)
            block = transformer_options["block"][1]
            if last is not None and block > last:
                self.exits[block] = self.exits.get(block, 0) + 1
                raise SourceDone(block)
        return h, hsp

    @staticmethod
    def wrapper(executor, x, *args, **kwargs):
        try:
            return executor(x, *args, **kwargs)
        except SourceDone:
            unet = executor.class_obj
            return x.new_zeros((x.shape[0], unet.out_channels, *x.shape[2:]))

    def install(self, model):
        m = model.clone()
        m.set_model_output_block_patch(self.patch)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, EXIT_KEY, self.wrapper)
        return m


class Probe:
    """Records what the edit pass of each step finds from the source pass, and the time (and, while
    ``count_flops``, the FLOPs) of each source call, by step."""

    def __init__(self):
        self.features: dict[int, tuple[dict, dict]] = {}
        self.seconds: dict[int, float] = {}
        self.flops: dict[int, int] = {}
        self.count_flops = False

    def __deepcopy__(self, memo: dict) -> "Probe":
        return self                               # ModelPatcher.clone deep-copies model_options

    def attn1_patch(self, n, context, value, extra_options):
        run = extra_options.get(host.RUN_KEY)
        if run is not None and run.pass_ is Pass.EDIT and run.step not in self.features:
            self.features[run.step] = (dict(run.source.tokens), dict(run.source.resblocks))
        return n, context, value

    def timer(self, executor, *args, **kwargs):
        run = args[5].get(host.RUN_KEY) if len(args) > 5 else kwargs.get("transformer_options", {}).get(host.RUN_KEY)
        if run is None or run.pass_ is not Pass.SOURCE:
            return executor(*args, **kwargs)
        counter = FlopCounterMode(display=False) if self.count_flops else contextlib.nullcontext()
        start = time.perf_counter()
        try:
            with counter:
                return executor(*args, **kwargs)
        finally:
            self.seconds[run.step] = self.seconds.get(run.step, 0.0) + time.perf_counter() - start
            if self.count_flops:
                self.flops[run.step] = self.flops.get(run.step, 0) + counter.get_total_flops()

    def install(self, model):
        m = model.clone()
        m.set_model_attn1_patch(self.attn1_patch)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "tve_bench_timer", self.timer)
        return m


def same_features(a: dict, b: dict) -> tuple[bool, str]:
    if a.keys() != b.keys():
        return False, f"steps {sorted(a)} vs {sorted(b)}"
    for step in a:
        for kind, x, y in zip(("tokens", "resblocks"), a[step], b[step]):
            if x.keys() != y.keys():
                return False, f"step {step} {kind}: {sorted(x)} vs {sorted(y)}"
            for key in x:
                if not torch.equal(x[key], y[key]):
                    return False, f"step {step} {kind} {key} differ"
    reads = sum(len(t) + len(r) for t, r in a.values())
    return True, f"{len(a)} steps, {reads} feature tensors read, all bit-identical"


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
    share spent before each output block and after each output block's ResBlock, and what the early exit saves
    of a source call for each injection preset, while q/k injection runs (attention and conv features read) and
    after it (conv features only)."""
    import comfy.ldm.modules.attention as attention
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel
    from tve.engine.injection import injection_targets
    unet = UNetModel(**UNETS[family], dtype=torch.float16, device="meta", operations=comfy.ops.disable_weight_init)
    counter = FlopCounterMode(display=False)
    before, after_resblock = {}, {}

    def mark(h, hsp, transformer_options):
        before[transformer_options["block"][1]] = counter.get_total_flops()
        return h, hsp

    handles = [layer.register_forward_hook(lambda m, i, o, b=b: after_resblock.__setitem__(b, counter.get_total_flops()))
               for b, block in enumerate(unet.output_blocks) for layer in block[:1] if isinstance(layer, ResBlock)]
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
    print("  " + ", ".join(f"{i}: {before[i] / total:.3f}/{after_resblock[i] / total:.3f}" for i in range(blocks)))
    model = _Unet(unet)
    for preset in ("tokenflow", "flatten"):
        attn, conv = injection_targets(model, preset)
        attn_ids = sorted({b.key[1] for b in attn})
        for phase, attn_read in (("attention + conv injection", attn_ids), ("conv injection only", [])):
            read = attn_read + list(conv)
            last = max(read)
            at_block = before[last + 1] / total if last + 1 < blocks else 1.0
            finer = after_resblock[last] / total if last in conv and last not in attn_read else at_block
            print(f"  {preset} preset, {phase}: reads output blocks {sorted(set(read))} (attention {attn_ids}, "
                  f"ResBlock {list(conv)}); exit before output block {last + 1 if last + 1 < blocks else '-'}: "
                  f"{1 - at_block:.1%} of the source call saved; exit right after the last read ResBlock: "
                  f"{1 - finer:.1%}", flush=True)


def _share(values: dict, steps: list) -> str:
    exit_, full = (sum(values[k].get(s, 0) for s in steps) for k in ("exit", "full"))
    return f"{exit_ / full:.3f}x"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--methods", nargs="+", default=["pnp-tokenflow", "pnp-flatten", "flatten", "tokenflow"],
                    choices=["pnp-tokenflow", "pnp-flatten", "flatten", "tokenflow"])
    ap.add_argument("--flops", nargs="*", metavar="FAMILY:SIZE", help="only the FLOP table of real UNets on "
                    "the meta device (e.g. sd15:64 sdxl:128); nothing sampled")
    _timing.add_arguments(ap, repeats=2, backends=("sub_quad",))
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
    clip = render_clip(opts.frames, 256, 256, seed=HELD_OUT_SEED, sprites=2)
    flow = FlowField(clip.flow_forward, clip.flow_backward, clip.occlusion_forward, "ground truth")
    base = load_trained_model("test_model_256")
    latent = frames_to_latent(clip.frames)
    x_T, inversion = invert(base, latent, trained_conditioning("source", "test_model_256"), opts.steps,
                            "ddim_uniform")
    trajectories = build_trajectories(flow, tuple(latent.shape[-2:]), seed=0)
    positive = trained_conditioning("target", "test_model_256")
    negative = trained_conditioning("empty", "test_model_256")

    def sample(model):
        return comfy.sample.sample_custom(model, torch.zeros_like(x_T), opts.cfg,
                                          comfy.samplers.sampler_object("euler"), inversion.sigmas, positive,
                                          negative, x_T, disable_pbar=True, seed=0)

    plain_before = sample(base)
    methods = {
        "pnp-tokenflow": lambda m: apply_feature_injection(m, inversion, 0.5, 0.8, "tokenflow", "sigma-matched"),
        "pnp-flatten": lambda m: apply_feature_injection(m, inversion, 0.5, 0.8, "flatten", "sigma-matched"),
        "flatten": lambda m: apply_feature_injection(apply_flatten(m, trajectories, "highest resolution",
                                                                   "dense_output"),
                                                     inversion, 0.5, 0.8, "flatten", "sigma-matched"),
        "tokenflow": lambda m: apply_tokenflow(m, inversion, 4, 0, "paper", 0.5, 0.8),
    }
    _timing.header(f"source-pass early exit, {opts.frames} frames, 32x32 latent, {opts.steps} steps, cfg {opts.cfg}, "
                   "attn_end 0.5, conv_end 0.8, trained 256 px test model (8 output blocks), CPU")
    for backend in opts.backends:
        print(f"## host attention: {_timing.backend_label(backend)}", flush=True)
        for name in opts.methods:
            edit_model = _timing.with_attention(methods[name](base), backend)
            probes = {"full": Probe(), "exit": Probe()}
            early = EarlyExit()
            models = {"full": probes["full"].install(edit_model),
                      "exit": early.install(probes["exit"].install(edit_model))}
            for p in probes.values():
                p.count_flops = True
            outs = {k: sample(m) for k, m in models.items()}
            ok, said = same_features(probes["full"].features, probes["exit"].features)
            same_out = torch.equal(outs["full"], outs["exit"])
            exited = sorted(s for s in probes["exit"].flops if probes["exit"].flops[s] < probes["full"].flops[s])
            print(f"{name}: source features {'SAME' if ok else 'DIFFERENT'} ({said}); edited latent "
                  f"{'bit-identical' if same_out else 'DIFFERENT'}; source calls ended before output block "
                  f"(block: calls) {early.exits or 'none'}, at steps {exited} of {sorted(probes['full'].flops)}",
                  flush=True)
            if not exited:
                continue
            flops = {k: p.flops for k, p in probes.items()}
            print(f"  {_share(flops, exited)} source-pass FLOPs with / without the exit at the steps that exit; "
                  f"{_share(flops, list(flops['full']))} over all source calls (FlopCounterMode, exact)", flush=True)
            for p in probes.values():
                p.count_flops, p.seconds = False, {}
            times = _timing.interleaved({k: (lambda m=m: sample(m)) for k, m in models.items()}, opts.repeats,
                                        warmup=False)
            seconds = {k: p.seconds for k, p in probes.items()}
            print(f"  {_share(seconds, exited)} source-pass UNet time with / without at those steps (summed over "
                  f"{opts.repeats} interleaved runs); {_timing.ratio_line(times, 'exit', 'full', 'whole edit')}",
                  flush=True)
    plain_after = sample(base)
    leftovers = {k for k in base.model_options["transformer_options"].get("wrappers", {}).get(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})} | set(
        base.model_options["transformer_options"].get("patches", {}))
    print(f"host afterwards: plain sampling {'bit-identical' if torch.equal(plain_before, plain_after) else 'CHANGED'}"
          f" to before; inference mode {torch.is_inference_mode_enabled()}; base model's diffusion-model wrappers "
          f"and patches {sorted(leftovers) or 'none'}", flush=True)


if __name__ == "__main__":
    main()
