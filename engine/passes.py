"""The sampling run of a TVE model: its keyed wrappers, the passes of every step, and the routers that let the
attention patches ask the methods of the model being sampled.

``outer_sample`` (OUTER_SAMPLE) makes a fresh ``SamplingRun`` for every sampling call, puts it into that call's
``transformer_options``, refuses a latent, σ schedule, noise or model the methods cannot use before any step, and
installs the methods' forward hooks for the run only (and the frame-pooled GroupNorms of FLATTEN's inflated UNet,
inversion included: statistics over the frames each pass holds, per CFG chunk). ``calc_cond_batch``
(CALC_COND_BATCH) is one step over the call's frames (the host may have split them into a core context window): a
``Step`` whose passes run, in frame windows of the model's ``FrameWindows``, as
  SOURCE     when a method reads the source video: the inversion's source latents at this σ with the source
             conditioning (PnP, Tumanyan et al. 2023 §4; TokenFlow §3.2); its UNet call ends right after the
             last feature a method reads at this step (``Step.source_end``): the later layers feed nothing read,
  EDIT       the sampler's call on the window's frames;
or as a step-driving method runs them (TokenFlow's KEYFRAMES and propagated EDIT passes; with its
``official`` propagation, a SOURCE pass whose self-attention is propagated too). INVERSION labels every
call while DDIM Inversion (TVE) inverts with the model. Frame ids are global throughout (``run.py``).

``apply_model`` (APPLY_MODEL) tells, per UNet call, which CFG chunks are still alike at the first self-attention
block. ``route_attention`` (attn1 replace) runs, per block, the last method that computes self-attention there with
the ones applied before it as its inner attention; ``route_attention_input`` (attn1 patch) keeps the source pass's
tokens the methods read and gives the edit the tokens a method injects.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..attention.group_norm import frame_layout, video_layout
from . import frame_windows, host, validation
from .masked_source import MaskedSource
from .run import Pass, SamplingRun, SourceFeatures, call_frame_ids, current_run

if TYPE_CHECKING:
    from .methods import Attention, BlockKey, Method, ReadPoint
    from .stack import MethodStack


# ---------------------------------------------------------------------------------------------- one step
@dataclass
class Step:
    """One CALC_COND_BATCH call: the executor and what it was called with, and the passes a step runs with it."""
    run: SamplingRun
    executor: Callable
    model: Any
    conds: list
    x_in: torch.Tensor                            # (F, C, h, w) the call's frames
    timestep: torch.Tensor                        # (F,)
    model_options: dict
    video_frames: int | None                      # frames of the whole video (None: unknown, core windows)
    windowed: bool                                # the host split the frames into a core context window

    @property
    def sigma(self) -> float:
        return float(self.timestep.reshape(-1)[0])

    @property
    def frames(self) -> int:
        return len(self.run.frame_ids)

    def in_windows(self, pass_: Pass) -> list:
        """``pass_`` (EDIT: after its source pass where a method reads the source) in each frame window: windows
        overlapping and blended when a method attends across frames, else batches (the same result)."""
        run, stack = self.run, self.run.stack
        schedule = stack.windows.schedule(self.frames, stack.attends_across_frames)
        if len(schedule) == 1:
            if pass_ is Pass.EDIT and self.reads_source():
                self.source_pass(None)
            return self.run_pass(pass_, None)
        shared = self._shared_frames()
        blend = frame_windows.Blend(self.frames)
        for window in frame_windows.windows_with_shared(schedule, shared):
            if pass_ is Pass.EDIT and self.reads_source():
                self.source_pass(window.frames)
            blend.add(window, self.run_pass(pass_, window.frames))
            run.source = SourceFeatures()               # a window's source features are not another's
        return blend.result(self.x_in.dtype)

    def reads_source(self) -> bool:
        return bool(self.run.stack.source_reads(self.run.step, self.run.steps))

    def _shared_frames(self) -> Callable[[Sequence[int]], list[int]]:
        """The positions a window must hold besides its own (the anchor frame, the step's keyframes)."""
        methods, frame_ids, step = self.run.stack.methods, self.run.frame_ids, self.run.sample_step
        return lambda own: sorted({i for m in methods for i in m.shared_frames(own, frame_ids, step)})

    def run_pass(self, pass_: Pass, positions: torch.Tensor | None) -> Any:
        """Run ``pass_`` over the call ``positions`` (None: all), with their conds and ControlNet hints."""
        run = self.run
        x, timestep, conds = self.x_in, self.timestep, self.conds
        if positions is not None:
            on = positions.to(x.device)
            x, timestep = x[on], timestep[on]
        if positions is not None or (self.windowed and self.video_frames is not None):
            conds = [self._conds_for(c, positions) for c in conds]
        run.pass_, run.pass_positions, run.pass_frame_ids = pass_, positions, run.frame_ids_at(positions)
        run.find_source_rows(positions, x.device)
        try:
            prepare_pass(run, x.device)
            return self.executor(self.model, conds, x, timestep, self.model_options)
        finally:
            run.pass_, run.pass_positions, run.pass_frame_ids, run.pass_source_rows = None, None, None, None

    def source_pass(self, positions: torch.Tensor | None) -> None:
        """SOURCE over the call ``positions`` (None: all): the inverted source at this σ, source conditioning; or,
        where the inversion stored them (``stored_source.py``), its features of that pass, replayed."""
        run, inversion = self.run, self.run.stack.inversion
        ids = run.frame_ids_at(positions)
        if inversion.stored is not None:             # kept by the inversion: the same features, no UNet call
            reads = run.stack.source_reads(run.step, run.steps)
            run.source = inversion.stored.features_at(stored_grid_step(inversion, self.sigma), ids, reads,
                                                      self.x_in.device)
            run.source.positions = positions
            return
        x_src, source_sigma = inversion.source_at(self.sigma, ids, run.stack.source_order)
        x_src = x_src.to(self.x_in.device, self.x_in.dtype)                               # (n, C, h, w)
        t_src = torch.full((x_src.shape[0],), max(source_sigma, run.sigma_floor), device=self.x_in.device,
                           dtype=self.x_in.dtype)
        conds = host.encode_conditioning(self.model, inversion.conditioning, x_src)
        run.source = SourceFeatures(positions=positions)
        run.pass_, run.pass_positions, run.pass_frame_ids = Pass.SOURCE, positions, ids
        run.source_end = self.source_end()
        try:
            prepare_pass(run, x_src.device)
            self.executor(self.model, [conds], x_src, t_src, self.model_options)
        finally:
            run.pass_, run.pass_positions, run.pass_frame_ids = None, None, None
            run.source_end = None

    def source_end(self) -> "ReadPoint | None":
        """Where this step's source pass may end its UNet call: after the last feature a method reads at this
        step (None: it runs the whole UNet). Every later layer feeds only what nobody reads, so the features kept,
        and the edit, are bit-identical either way (``MethodStack.source_exit`` off: the whole UNet)."""
        run = self.run
        if not run.stack.source_exit or not host.ends_unet_calls(self.model_options["transformer_options"]):
            return None
        return run.stack.source_reads(run.step, run.steps).last_point()

    def _conds_for(self, conds: list[dict] | None, positions: torch.Tensor | None) -> list[dict] | None:
        if conds is None:
            return None
        frames = self.x_in.shape[0]
        positions = torch.arange(frames) if positions is None else positions
        ids = self.run.frame_ids_at(positions)
        return [host.cond_for_frames(c, positions, frames, ids, self.video_frames, self.run.controls) for c in conds]


def stored_grid_step(inversion: Any, sigma: float) -> int:
    """The grid step of ``sigma`` for stored source features, which exist at the grid's σ only."""
    try:
        return inversion.index_of(sigma)
    except ValueError:
        raise ValueError(f"sampler: evaluates the model at σ={sigma:.5f}, between two σ of the inversion's grid, "
                         "where its stored source features do not exist; use a sampler that evaluates at the grid's "
                         "σ only (euler, ddim, dpmpp_2m, ...) or set Apply FLATTEN's source_features to live"
                         ) from None


# ---------------------------------------------------------------------------------------------- the wrappers
def outer_sample(executor: Callable, noise: torch.Tensor, latent_image: torch.Tensor, sampler: Any,
                 sigmas: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """OUTER_SAMPLE: a fresh SamplingRun for this sampling call; refuse, before any step, what the methods cannot
    use (``validation.sampling_run``); the methods' forward hooks and frame-pooled norms for this run only; keep
    the source outside a LATENT's noise_mask (``masked_source.py``)."""
    patcher = host.sampling_model(executor)
    stack = host.get_attachment(patcher)                # the MethodStack ``stack.install`` attached
    for method in stack.methods:
        method.check_latent(latent_image)
    stack.check_context_windows(host.context_window_length(patcher))
    inversion = stack.inversion
    editing = inversion is not None and not stack.inverting
    if editing:
        validation.inversion_schedule(inversion, sigmas)
    validation.sampling_run(patcher, noise, latent_image, sigmas, inversion,
                            [s for s in stack.sources() if s is not inversion], stack.inverting)
    if editing:
        check_inversion_weights(patcher, stack)
    validation.sampled_noise_mask(args[0] if args else kwargs.get("denoise_mask"), latent_image.shape, "latent_image")
    run = SamplingRun(stack=stack, sigma_floor=host.sigma_min(patcher))
    host.set_sampling_run(executor, run)
    if stack.inverting:
        hooks = {} if stack.recording is None else stack.recording.run_hooks(patcher, lambda: run.pass_frame_ids)
    else:
        hooks = {module: fn for m in stack.methods for module, fn in m.run_hooks(patcher, run).items()}
    pooled = [module for m in stack.methods for module in m.frame_pooled_norms(patcher)]
    with host.forward_hooks(hooks), host.calls_in_layout(pooled, lambda x: video_layout(x, run.frames_per_chunk()),
                                                         frame_layout):
        out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
    if editing:
        denoise_mask = args[0] if args else kwargs.get("denoise_mask")
        out = MaskedSource(inversion).blend(patcher, out, denoise_mask, float(sigmas[-1]))
        inversion.remember_end(patcher, out, float(sigmas[-1]))
    return out


def check_inversion_weights(patcher: Any, stack: "MethodStack") -> None:
    """Before the first step: the sampled model runs the weights the inversion was made with (a LoRA added after
    the node that reads it changes them), else refused naming the ``inversion`` wire unless the methods allow
    other weights; then said once in the server log (where the node has not said it already). One
    ``host.weights_fingerprint`` per sampling call (bench/weights_fingerprint.py)."""
    node, allowed = stack.other_weights()
    note = validation.inversion_weights(stack.inversion, host.weights_fingerprint(patcher), str(node), allowed)
    if note is not None and stack.inversion.say_once(note):
        logging.warning("[TVE] %s", note)


def calc_cond_batch(executor: Callable, model: Any, conds: list, x_in: torch.Tensor, timestep: torch.Tensor,
                    model_options: dict) -> Any:
    """CALC_COND_BATCH: one step over the call's frames -> one (F, C, h, w) per cond."""
    options = model_options["transformer_options"]
    run = current_run(options)
    if run is None:                                # sampled outside a TVE sampling run: nothing of TVE's to do
        return executor(model, conds, x_in, timestep, model_options)
    stack = run.stack
    begin_call(run, x_in.shape[0], timestep, options)
    windowed = host.context_window(options) is not None
    inversion = stack.inversion
    video_frames = inversion.frames if inversion is not None else (None if windowed else len(run.frame_ids))
    step = Step(run, executor, model, conds, x_in, timestep, model_options, video_frames, windowed)
    if stack.inverting:
        return step.in_windows(Pass.INVERSION)
    if inversion is not None:
        validation.call_fits_inversion(x_in, run.frame_ids, windowed, inversion.frames, inversion.latent_shape)
        for cond in (c for chunk in conds if chunk for c in chunk if c.get("control") is not None):
            validation.control_hints(cond["control"], video_frames)
        run.step, run.steps = inversion.step_of(step.sigma), inversion.steps
    driver = stack.step_driver
    return driver.drive_step(step) if driver is not None else step.in_windows(Pass.EDIT)


def prepare_pass(run: SamplingRun, device: torch.device) -> None:
    """What the methods' attention reads during the pass now starting, on ``device``, once per pass."""
    for method in run.stack.methods:
        method.prepare_pass(run, device)


def apply_model(executor: Callable, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None, c_crossattn: Any = None,
                control: Any = None, transformer_options: dict | None = None, **kwargs: Any) -> Any:
    """APPLY_MODEL: around each UNet call, which of its CFG chunks are still alike at the first self-attention block
    (``host.chunks_alike_before_text``: one read of the call's inputs, never one per block) for methods that compute
    such chunks once."""
    options = {} if transformer_options is None else transformer_options
    run = current_run(options)
    if run is None or not any(m.computes_alike_chunks_once for m in run.stack.methods):
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    run.alike_chunks = host.chunks_alike_before_text(x, t, c_concat, control, options, kwargs,
                                                     own_patches=(route_attention_input,))
    try:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    finally:
        run.alike_chunks = None


def begin_call(run: SamplingRun, frames: int, timestep: torch.Tensor, transformer_options: dict) -> None:
    """What a call's patches read of it, computed once per call (the step reads a device value): its frame ids,
    the sampler's step and how far through its schedule that is."""
    run.pass_frame_ids = None
    run.frame_ids = call_frame_ids(frames, transformer_options)
    run.sample_step = host.current_step(timestep, transformer_options)
    run.schedule_percent = run.sample_step / host.schedule_length(transformer_options) if run.sample_step >= 0 else 0.0
    run.source = SourceFeatures()


# ---------------------------------------------------------------------------------------------- routers
def route_attention_input(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
    """attn1 patch (before projection) of every TVE model that reads a source: keeps the source pass's tokens the
    methods read this step; in the edit and keyframe passes, a method may give the tokens q and k come from
    (PnP's q/k injection, Eq. 4: q = to_q(n_src), k = to_k(n_src), v = to_v(n))."""
    run = current_run(extra_options)
    if run is None:
        return n, context, value
    key = host.block_key(extra_options)
    if run.pass_ is Pass.INVERSION:
        if run.stack.recording is not None:                                          # FLATTEN's stored features
            run.stack.recording.keep_tokens(run.pass_frame_ids, key, n)             # (F, T, C)
    elif run.pass_ is Pass.SOURCE:
        if key in run.stack.source_reads(run.step, run.steps).tokens:
            run.keep_source_tokens(key, n)                                            # (F, T, C)
    elif run.pass_ in (Pass.EDIT, Pass.KEYFRAMES):
        for method in reversed(run.stack.methods):
            tokens = method.attention_input(key, n, run)
            if tokens is not None:
                return tokens, tokens, value
    return n, context, value


def route_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """attn1 replace of every block a TVE method computes self-attention on."""
    run = current_run(extra_options)
    key = host.block_key(extra_options)
    if run is None:
        return host.optimized_attention(q, k, v, extra_options["n_heads"], extra_options)
    return attention_on(run, key)(q, k, v, extra_options)


def attention_on(run: SamplingRun, key: "BlockKey") -> "Attention":
    """Block ``key``'s self-attention: its last method, with the ones before it (then another pack's replace, then
    the host's backend) as inner attention."""
    inner = run.stack.foreign.get(key) or (lambda q, k, v, extra: host.optimized_attention(
        q, k, v, extra["n_heads"], extra))
    for method in run.stack.attention_chain(key):
        inner = _with_inner(method, run, inner)
    return inner


def _with_inner(method: "Method", run: SamplingRun, inner: "Attention") -> "Attention":
    return lambda q, k, v, extra: method.attend(q, k, v, extra, run, inner)
