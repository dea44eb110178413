"""One TVE state per MODEL: the features applied, in order, and the passes they run at every denoising step.

Every TVE node that patches a MODEL adds its feature to the ``State`` attached to its clone (a ComfyUI model
attachment, key ``text_video_edit``) and re-installs the state's one set of keyed wrappers; the state decides, when
the node runs, whether the feature composes with the ones already applied (``Refused`` names both nodes and the
order that works). The attention patches the state installs are routers: they read the sampling ``Run`` (the one
place that says which ``Pass`` runs, over which frames, at which step, with the ``StepFeatures`` of that step) from
``transformer_options`` and ask the features of the state that made the run.

Per step (a CALC_COND_BATCH call; the host may have split the frames into a core context window), the state runs
its passes in frame windows of at most ``State.windows`` frames (TVE_FrameWindows, ``windows.py``): overlapping
windows blended when the model attends across frames, batches otherwise. In each window:
  SOURCE     when a feature reads the source video: the inversion's source latents at this σ with the source
             conditioning (PnP, Tumanyan et al. 2023 §4; TokenFlow §3.2);
  KEYFRAMES  TokenFlow's keyframe pass over a group of the step's keyframes, with their conds and ControlNet hints;
  EDIT       the sampler's call on the window's frames; with TokenFlow its self-attention outputs are the
             propagated keyframe tokens.
INVERSION labels every call while TVE_DDIMInversion inverts with the model. Frame ids are global ids throughout,
so windows only change which frames a pass holds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from ..attention import windows as frame_windows
from . import host, validation
from .masked_edit import MaskedSource
from .windows import FrameWindows

if TYPE_CHECKING:
    from .inversion import Inversion

BlockKey = tuple[str, int, int]


class Pass(Enum):
    INVERSION = "inversion"      # TVE_DDIMInversion walking up the σ grid
    SOURCE = "source"            # the inverted source at this step's σ, source conditioning
    KEYFRAMES = "keyframes"      # TokenFlow: the keyframes of this step, edit conditioning
    EDIT = "edit"                # the sampler's own call


class Refused(ValueError):
    """A feature that does not compose with one already on the model; says which order works."""


# ---------------------------------------------------------------------------------------------- per-step store
@dataclass
class StepFeatures:
    """What one step's passes leave for the later passes of the same step (cleared at every step)."""
    source_tokens: dict[BlockKey, torch.Tensor] = field(default_factory=dict)     # SOURCE: attn1 input n, (F, T, C)
    source_resblocks: dict[int, torch.Tensor] = field(default_factory=dict)       # SOURCE: ResBlock branch (F, C, h, w)
    source_local: torch.Tensor | None = None      # SOURCE: the call's frames it held (local indices; None: all)
    keyframe_out: dict[tuple[BlockKey, Any], torch.Tensor] = field(default_factory=dict)  # KEYFRAMES: (K, T, C)
    fields: dict[BlockKey, tuple] = field(default_factory=dict)                   # TokenFlow NN fields per block


@dataclass
class Run:
    """The sampling run of one state: the pass now running (the one place patches and hooks read it from)."""
    pass_: Pass | None = None
    step: int = -1                                # interval of the inversion grid holding this step's σ
    steps: int = 0
    frame_ids: tuple[int, ...] = ()               # global ids of the step's call (a context window's frames)
    pass_frame_ids: tuple[int, ...] | None = None  # global ids of the pass now running
    pass_frames: torch.Tensor | None = None       # their local indices into frame_ids (None: all of them)
    tokenflow: Any = None                         # TokenFlow: this step's keyframes and their kept tokens
    sigma_floor: float = 0.0
    features: StepFeatures = field(default_factory=StepFeatures)
    controls: dict = field(default_factory=dict)  # ControlNet copies per (control, frames), host.control_for_frames
    state: Any = field(default=None, repr=False)  # the State that runs the passes

    def reset(self, sigma_floor: float = 0.0) -> None:
        """Forget everything of the last sampling run (MODEL outputs are cached across prompts)."""
        state = self.state
        self.__init__(sigma_floor=sigma_floor, state=state)

    def source_frames(self, features: torch.Tensor) -> torch.Tensor:
        """The source pass's ``features`` (a row per frame it held) at the frames of the pass now running."""
        return features[self.source_rows(self.pass_frames).to(features.device)] if self._sliced() else features

    def source_rows(self, local: torch.Tensor | None) -> torch.Tensor:
        """Rows of the source pass's features holding the call's frames ``local`` (None: all of them)."""
        frames = len(self.frame_ids)
        held = self.features.source_local
        held = torch.arange(frames) if held is None else held
        local = torch.arange(frames) if local is None else local
        row = torch.full((frames,), -1, dtype=torch.long)
        row[held] = torch.arange(len(held))
        rows = row[local]
        if bool((rows < 0).any()):
            raise RuntimeError(f"TVE: the source pass of this step did not hold frames "
                               f"{[self.frame_ids[i] for i in local[rows < 0].tolist()]}")
        return rows

    def _sliced(self) -> bool:
        held, local = self.features.source_local, self.pass_frames
        if held is None and local is None:
            return False
        return not (held is not None and local is not None and torch.equal(held, local))


def current_run(transformer_options: Mapping[str, Any]) -> Run | None:
    return transformer_options.get(host.RUN_KEY)


def current_pass(transformer_options: Mapping[str, Any]) -> Pass | None:
    run = current_run(transformer_options)
    return None if run is None else run.pass_


# ---------------------------------------------------------------------------------------------- features
class AttentionFeature:
    """A feature that computes self-attention on some blocks (FLATTEN, cross-frame attention)."""
    node: str = ""                                # display name, for refusals
    blocks: frozenset = frozenset()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Injection:
    """PnP settings (TVE_ApplyFeatureInjection, or TokenFlow's own): where and until when the source's q/k and
    ResBlock features replace the edit's, and which source latent each step reads."""
    node: str
    inversion: "Inversion"
    attn_keys: frozenset
    conv_ids: tuple[int, ...]
    attn_end: float
    conv_end: float
    order: str = "sigma-matched"

    def attn_active(self, step: int, steps: int) -> bool:
        return step < int(steps * self.attn_end)

    def conv_active(self, step: int, steps: int) -> bool:
        return step < int(steps * self.conv_end)


# ---------------------------------------------------------------------------------------------- the state
FLATTEN_NODE = "Apply FLATTEN (TVE)"
CROSS_FRAME_NODE = "Apply Cross-Frame Attention (TVE)"
INJECTION_NODE = "Apply Feature Injection (TVE)"
TOKENFLOW_NODE = "Apply TokenFlow (TVE)"
MOTION_NODE = "Motion Dynamics Latents (TVE)"
WINDOWS_NODE = "Frame Windows (TVE)"


@dataclass(frozen=True)
class Call:
    """One CALC_COND_BATCH call: what its passes run the inner executor with."""
    executor: Callable
    model: Any
    conds: list
    x_in: torch.Tensor                            # (F, C, h, w) the call's frames
    timestep: torch.Tensor                        # (F,)
    model_options: dict
    video_frames: int | None                      # frames of the whole video (None: unknown, core windows)
    windowed: bool                                # the host split the frames into a core context window


@dataclass(frozen=True)
class State:
    """The TVE features of one MODEL, in the order applied. Immutable: each node attaches a new one to its clone."""
    applied: tuple[str, ...] = ()                             # display names, in order
    attention: Mapping[BlockKey, AttentionFeature] = field(default_factory=dict)   # per block, the last applied
    foreign: Mapping[BlockKey, Callable] = field(default_factory=dict)   # other packs' replaces TVE routes around
    injection: Injection | None = None
    tokenflow: Any = None                                     # tokenflow.TokenFlow
    windows: FrameWindows = FrameWindows()                    # frames per pass (TVE_FrameWindows)
    inverting: bool = False
    run: Run = field(default_factory=Run, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.run.state = self

    # ------------------------------------------------------------------------------------------ composition
    @property
    def inversion(self) -> "Inversion | None":
        return None if self.injection is None else self.injection.inversion

    @property
    def trajectories(self) -> list:
        """The TRAJECTORIES of the attention features (FLATTEN), each once."""
        found = {id(f.trajectories): f.trajectories for f in self.attention.values() if hasattr(f, "trajectories")}
        return list(found.values())

    def has(self, node: str) -> bool:
        return node in self.applied

    def cross_frame_modes(self) -> set[str]:
        return {getattr(f, "mode", None) for f in self.attention.values()} - {None}

    def with_attention(self, feature: AttentionFeature, blocks: Sequence[BlockKey]) -> "State":
        """Add FLATTEN or a cross-frame mode on ``blocks``; an earlier one of the same node on a block is replaced
        (the later settings win), FLATTEN and cross-frame attention never share a model."""
        if self.tokenflow is not None:
            raise Refused(f"{feature.node} after {TOKENFLOW_NODE}: TokenFlow replaces every self-attention output "
                          f"of the edit with propagated keyframe tokens, so nothing applied after it would run. "
                          f"Apply {feature.node} first, then {TOKENFLOW_NODE} (it then drives the keyframe pass).")
        others = {f.node for f in self.attention.values()} - {feature.node}
        if others:
            other = others.pop()
            raise Refused(f"{feature.node} after {other}: both replace self-attention, and FLATTEN's dense attention "
                          f"already attends across all frames; use one of them (neither order composes).")
        return self._added(feature.node, attention={**self.attention, **{key: feature for key in blocks}})

    def with_injection(self, injection: Injection) -> "State":
        """PnP injection: one per model; applied again (or by TokenFlow), the later settings win."""
        self._same_inversion(injection)
        return self._added(injection.node, injection=injection)

    def with_tokenflow(self, tokenflow: Any, injection: Injection) -> "State":
        """TokenFlow (with its PnP settings): one per model, the later settings win; the attention applied before
        it drives its keyframe pass."""
        self._same_inversion(injection)
        if "anchor" in self.cross_frame_modes():
            raise Refused(f"{TOKENFLOW_NODE} after {CROSS_FRAME_NODE} mode 'anchor': TokenFlow's keyframe pass holds "
                          "only the keyframes, so the anchor frame is not there to attend to. Use mode 'keyframes', "
                          "'dense' or 'fine_coarse' before TokenFlow, or anchor attention without TokenFlow.")
        return self._added(TOKENFLOW_NODE, tokenflow=tokenflow, injection=injection)

    def with_windows(self, windows: FrameWindows) -> "State":
        """The frames per pass of every TVE pass of this model (any order on the chain; the later node wins)."""
        return self._added(WINDOWS_NODE, windows=windows)

    def check_motion_dynamics(self) -> None:
        """Motion Dynamics Latents samples one new frame from noise: only cross-frame attention (a no-op on one
        frame) may be on its model."""
        for node in (FLATTEN_NODE, INJECTION_NODE, TOKENFLOW_NODE):
            if self.has(node):
                raise Refused(f"{MOTION_NODE} after {node}: it samples one new frame from noise, which the "
                              f"{'trajectories' if node == FLATTEN_NODE else 'inversion'} of {node} do not "
                              f"describe. Give {MOTION_NODE} the model from before {node}, and apply {node} to "
                              "the model that samples its latents.")

    def _same_inversion(self, injection: Injection) -> None:
        if self.inversion is not None and injection.inversion is not self.inversion:
            earlier = next(n for n in reversed(self.applied) if n in (INJECTION_NODE, TOKENFLOW_NODE))
            raise Refused(f"{injection.node} after {earlier}: they read different inversions, but a model runs "
                          "one source pass per step; connect the same DDIM Inversion (TVE) output to both.")

    def _added(self, node: str, **changes: Any) -> "State":
        applied = tuple(n for n in self.applied if n != node) + (node,)
        return dataclasses.replace(self, applied=applied, **changes)

    # ------------------------------------------------------------------------------------------ sampling
    def outer_sample(self, executor: Callable, noise: torch.Tensor, latent_image: torch.Tensor, sampler: Any,
                     sigmas: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """A fresh Run for every sampling run; refuse, before any step, a latent, σ schedule, noise or model the
        features cannot use (validation.sampling_run); hook the ResBlocks PnP injects for this run only; keep the
        source outside a LATENT's noise_mask (masked_edit)."""
        for feature in {id(f): f for f in self.attention.values()}.values():
            check = getattr(feature, "check_latent", None)
            if check is not None:
                check(latent_image)
        editing = self.inversion is not None and not self.inverting
        if editing:
            self.inversion.check_schedule(sigmas)
        patcher = host.sampling_model(executor)
        validation.sampling_run(patcher, noise, latent_image, sigmas, self.inversion, self.trajectories,
                                self.inverting)
        validation.sampled_noise_mask(args[0] if args else kwargs.get("denoise_mask"), latent_image.shape, "latent_image")
        self.run.reset(host.sigma_min(patcher))
        hooks = {}
        if self.injection is not None and not self.inverting:
            hooks = {i: self._resblock_hook(i) for i in self.injection.conv_ids}
        try:
            with host.resblock_output_hooks(patcher, hooks):
                out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            self.run.reset()
        if editing:
            denoise_mask = args[0] if args else kwargs.get("denoise_mask")
            out = MaskedSource(self.inversion).blend(patcher, out, denoise_mask, float(sigmas[-1]))
            self.inversion.remember_end(patcher, out, float(sigmas[-1]))
        return out

    def calc_cond_batch(self, executor: Callable, model: Any, conds: list, x_in: torch.Tensor,
                        timestep: torch.Tensor, model_options: dict) -> Any:
        """One step over the call's frames, window by window (``windows.py``): -> one (F, C, h, w) per cond."""
        run = self.run
        options = model_options["transformer_options"]
        run.pass_frame_ids = None
        frame_ids = host.call_frame_ids(x_in.shape[0], options)
        windowed = options.get("context_window") is not None
        video_frames = self.inversion.frames if self.inversion is not None else (None if windowed else len(frame_ids))
        run.frame_ids = frame_ids
        run.features = StepFeatures()
        call = Call(executor, model, conds, x_in, timestep, model_options, video_frames, windowed)
        if self.inverting:
            return self._windowed(call, Pass.INVERSION)
        sigma = float(timestep.reshape(-1)[0])
        if self.inversion is not None:
            validation.call_fits_inversion(x_in, frame_ids, windowed, self.inversion.frames,
                                           self.inversion.latent_shape)
            for cond in (c for chunk in conds if chunk for c in chunk if c.get("control") is not None):
                host.check_control_hints(cond["control"], video_frames)
            run.step, run.steps = self.inversion.step_of(sigma), self.inversion.steps
        if self.tokenflow is not None:
            return self._tokenflow_step(call, sigma)
        return self._windowed(call, Pass.EDIT, sigma)

    def _windowed(self, call: Call, name: Pass, sigma: float | None = None) -> list:
        """``name`` (with its source pass first, when a feature reads the source) in each frame window: windows
        overlapping and blended when the model attends across frames, else batches (the same result)."""
        run = self.run
        frames = len(run.frame_ids)
        size = self.windows.size or frames
        if self.attention:
            schedule = frame_windows.overlapping_windows(frames, size, self.windows.overlap)
        else:
            schedule = frame_windows.batches(frames, size)
        shared = self._shared_frames(call) if len(schedule) > 1 else lambda own: ()
        blend = frame_windows.Blend(frames)
        for window in frame_windows.windows_with_shared(schedule, shared):
            local = None if len(schedule) == 1 else window.frames
            if name is Pass.EDIT and self._wants_source(run.step, run.steps):
                self._source_pass(call, sigma, local)
            out = self._pass(name, call, local)
            if len(schedule) == 1:
                return out
            run.features = StepFeatures()                # a window's source features are not another's
            blend.add(window, out)
        return blend.result(call.x_in.dtype)

    def _shared_frames(self, call: Call) -> Callable[[Sequence[int]], list[int]]:
        """The frames a window must hold besides its own (the anchor frame, the step's keyframes)."""
        step = host.current_step({"sigmas": call.timestep,
                                  "sample_sigmas": call.model_options["transformer_options"].get("sample_sigmas")})
        features = [f for f in {id(f): f for f in self.attention.values()}.values() if hasattr(f, "shared_frames")]
        frame_ids = self.run.frame_ids
        return lambda own: sorted({i for f in features for i in f.shared_frames(own, frame_ids, step)})

    def _tokenflow_step(self, call: Call, sigma: float) -> list:
        """TokenFlow's passes in frame batches (the reference code's ``batch_size``): keyframes drawn once on all
        frames; each batch runs one source pass over its frames and the keyframes it newly needs, the keyframe
        pass of each new group of keyframes, then its edit pass, which propagates from the keyframes it needs.
        A group's keyframes attend to each other and to the neighbouring group's nearest keyframe (kept only as
        context), so memory holds one batch and a few keyframes whatever the video's length; one batch of every
        frame is TokenFlow's single pass over the whole video."""
        run, tokenflow = self.run, self.tokenflow
        frames = len(run.frame_ids)
        keyframes = tokenflow.keyframes(run.frame_ids, run.step)                        # (K,) local, by global id
        step = run.tokenflow = tokenflow.step_keyframes(run.frame_ids, keyframes)
        order = sorted(range(frames), key=run.frame_ids.__getitem__)                    # by global id
        size = self.windows.size or frames
        frame_batches = [sorted(order[s:s + size]) for s in range(0, frames, size)]
        groups = step.groups(len(keyframes) if len(frame_batches) == 1 else -(-size // tokenflow.interval))
        blend = frame_windows.Blend(frames)
        try:
            for batch in frame_batches:
                batch_local = torch.tensor(batch, dtype=torch.long)
                needed = step.needed(batch_local)
                keyframe_passes = groups.missing(needed)
                held = sorted(set(batch) | {int(keyframes[j]) for _, ctx in keyframe_passes for j in ctx})
                held_local = None if len(held) == frames else torch.tensor(held, dtype=torch.long)
                self._source_pass(call, sigma, held_local)
                for own, context in keyframe_passes:
                    self._pass(Pass.KEYFRAMES, call, keyframes[context])
                    step.keep(own, context, run)
                out = self._pass(Pass.EDIT, call, None if len(frame_batches) == 1 else batch_local)
                if len(frame_batches) == 1:
                    return out
                step.forget_before(int(needed.min()))
                run.features = StepFeatures()
                blend.add(frame_windows.Window(batch_local, torch.ones(len(batch))), out)
            return blend.result(call.x_in.dtype)
        finally:
            run.tokenflow = None

    def _pass(self, name: Pass, call: Call, local: torch.Tensor | None) -> Any:
        """Run pass ``name`` over the call's frames ``local`` (None: all), with their conds and ControlNet hints."""
        run = self.run
        x, timestep, conds = call.x_in, call.timestep, call.conds
        if local is not None:
            dev = local.to(x.device)
            x, timestep = x[dev], timestep[dev]
        if local is not None or (call.windowed and call.video_frames is not None):
            conds = [self._conds_for(c, call, local) for c in conds]
        ids = run.frame_ids if local is None else tuple(run.frame_ids[i] for i in local.tolist())
        run.pass_, run.pass_frame_ids, run.pass_frames = name, ids, local
        try:
            return call.executor(call.model, conds, x, timestep, self._options(call))
        finally:
            run.pass_, run.pass_frame_ids, run.pass_frames = None, None, None

    def _options(self, call: Call) -> dict:
        """The call's model options with this state's Run in transformer_options (what the routers read)."""
        options = call.model_options.copy()
        options["transformer_options"] = {**call.model_options["transformer_options"], host.RUN_KEY: self.run}
        return options

    def _conds_for(self, conds: list[dict] | None, call: Call, local: torch.Tensor | None) -> list[dict] | None:
        if conds is None:
            return None
        frames = call.x_in.shape[0]
        local = torch.arange(frames) if local is None else local
        ids = [self.run.frame_ids[i] for i in local.tolist()]
        return [host.cond_for_frames(c, local, frames, ids, call.video_frames, self.run.controls) for c in conds]

    def _wants_source(self, step: int, steps: int) -> bool:
        inj = self.injection
        return inj is not None and (self.tokenflow is not None or inj.attn_active(step, steps)
                                    or inj.conv_active(step, steps))

    def _source_pass(self, call: Call, sigma: float, local: torch.Tensor | None) -> None:
        """SOURCE over the call's frames ``local`` (None: all): the inverted source at this σ, source conds."""
        run = self.run
        ids = run.frame_ids if local is None else tuple(run.frame_ids[i] for i in local.tolist())
        x_src, source_sigma = self.inversion.source_at(sigma, ids, self.injection.order)
        x_src = x_src.to(call.x_in.device, call.x_in.dtype)                             # (n, C, h, w)
        t_src = torch.full((x_src.shape[0],), max(source_sigma, run.sigma_floor), device=call.x_in.device,
                           dtype=call.x_in.dtype)
        conds = host.encode_conditioning(call.model, self.inversion.conditioning, x_src)
        run.features.source_local = local
        run.pass_, run.pass_frame_ids, run.pass_frames = Pass.SOURCE, ids, local
        try:
            call.executor(call.model, [conds], x_src, t_src, self._options(call))
        finally:
            run.pass_, run.pass_frame_ids, run.pass_frames = None, None, None

    # ------------------------------------------------------------------------------------------ patches
    def wants_tokens(self, key: BlockKey, run: Run) -> bool:
        """Keep the source pass's attn1 input of ``key`` this step: TokenFlow's NN field, PnP's q/k."""
        if self.tokenflow is not None:
            return True
        inj = self.injection
        return inj is not None and key in inj.attn_keys and inj.attn_active(run.step, run.steps)

    def injected_tokens(self, key: BlockKey, run: Run) -> torch.Tensor | None:
        inj = self.injection
        if inj is None or key not in inj.attn_keys or not inj.attn_active(run.step, run.steps):
            return None
        source = run.features.source_tokens.get(key)
        return None if source is None else run.source_frames(source)

    def _resblock_hook(self, block_id: int) -> Callable[[torch.Tensor], torch.Tensor | None]:
        def hook(h: torch.Tensor) -> torch.Tensor | None:
            run, inj = self.run, self.injection
            if not inj.conv_active(run.step, run.steps):
                return None
            if run.pass_ is Pass.SOURCE:
                run.features.source_resblocks[block_id] = h                            # (F, C, h, w)
            elif run.pass_ in (Pass.EDIT, Pass.KEYFRAMES) and block_id in run.features.source_resblocks:
                source = run.source_frames(run.features.source_resblocks[block_id])
                return source.repeat(h.shape[0] // source.shape[0], 1, 1, 1)           # (chunks·F, C, h, w)
            return None

        return hook


# ---------------------------------------------------------------------------------------------- routers
def route_attn1_patch(n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
    """attn1 patch (before projection) of every TVE model: keeps the source pass's tokens, and in the edit and
    keyframe passes gives q = to_q(n_src), k = to_k(n_src), v = to_v(n) — PnP's q/k injection (Eq. 4)."""
    run = current_run(extra_options)
    state = run_state(run)
    if state is None:
        return n, context, value
    key = host.block_key(extra_options)
    if run.pass_ is Pass.SOURCE:
        if state.wants_tokens(key, run):
            run.features.source_tokens[key] = n                                       # (F, T, C)
    elif run.pass_ in (Pass.EDIT, Pass.KEYFRAMES):
        source = state.injected_tokens(key, run)
        if source is not None:
            source = source.repeat(n.shape[0] // source.shape[0], 1, 1)                # (chunks·F, T, C)
            return source, source, value
    return n, context, value


def route_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
    """attn1 replace of every block a TVE feature computes self-attention on."""
    run = current_run(extra_options)
    state = run_state(run)
    key = host.block_key(extra_options)
    if state is None:
        return host.optimized_attention(q, k, v, extra_options["n_heads"], extra_options)
    base = state.attention.get(key)
    if state.tokenflow is not None and run.pass_ in (Pass.KEYFRAMES, Pass.EDIT):
        return state.tokenflow.attend(q, k, v, extra_options, run, key, base or state.foreign.get(key))
    if base is not None:
        return base.attend(q, k, v, extra_options)
    inner = state.foreign.get(key)
    return inner(q, k, v, extra_options) if inner else host.optimized_attention(q, k, v, extra_options["n_heads"],
                                                                              extra_options)


def run_state(run: Run | None) -> State | None:
    return None if run is None else run.state


# ---------------------------------------------------------------------------------------------- installing
def state_of(model: Any) -> State:
    """The TVE state on ``model`` (an empty one if no TVE node patched it)."""
    state = host.get_attachment(model)
    return state if isinstance(state, State) else State()


def install(model: Any, state: State) -> Any:
    """Attach ``state`` to the clone ``model`` with its wrappers and routers; returns ``model``."""
    routed = {key for key, fn in host.attn1_replaces(model).items() if fn is route_attention}
    blocks = set(state.attention)
    if state.tokenflow is not None:
        blocks |= {b.key for b in host.attention_blocks(model)}
    foreign = dict(state.foreign)
    for key, fn in host.attn1_replaces(model).items():
        if key in blocks and key not in routed and key not in foreign:
            foreign[key] = fn
    state = dataclasses.replace(state, foreign=foreign)
    inversion = [] if state.inversion is None else [state.inversion]
    newest_reads_inversion = bool(state.applied) and state.applied[-1] in (INJECTION_NODE, TOKENFLOW_NODE)
    validation.same_sources(state.trajectories + inversion if newest_reads_inversion
                            else inversion + state.trajectories)
    if state.inversion is not None:             # a masked run follows the source outside the mask
        host.set_inpaint_latent(model, MaskedSource(state.inversion).latent_at)
    host.set_attn1_replace(model, route_attention, sorted(blocks - routed))
    if state.injection is not None or state.tokenflow is not None:
        host.ensure_attn1_patch(model, route_attn1_patch)
    host.set_attachment(model, state)
    _bind(model, state)
    return model


def _bind(model: Any, state: State) -> None:
    host.set_wrapper(model, host.OUTER_SAMPLE, state.outer_sample)
    host.set_wrapper(model, host.CALC_COND_BATCH, state.calc_cond_batch)


def check_no_foreign_attention(model: Any, blocks: Sequence[BlockKey], node: str) -> None:
    """Refuse to hide another node's attn1 replace under FLATTEN or cross-frame attention (they compute their own
    self-attention; TokenFlow instead runs such a replace in its keyframe pass)."""
    foreign = sorted(key for key, fn in host.attn1_replaces(model).items() if key in set(blocks)
                     and fn is not route_attention)
    if foreign:
        raise Refused(f"{node}: another node already replaced self-attention on {len(foreign)} blocks (e.g. "
                      f"{foreign[0]}), which {node} would hide. Apply {node} first, then that node.")


def apply(model: Any, update: Callable[[State], State]) -> Any:
    """Clone ``model`` and attach ``update(state)``; a Refused from ``update`` leaves nothing half-applied."""
    state = update(state_of(model))
    return install(model.clone(), state)


def for_inversion(model: Any) -> Any:
    """A clone of ``model`` whose TVE state labels every call INVERSION (no source or keyframe passes)."""
    m = model.clone()
    state = host.get_attachment(m)
    install(m, dataclasses.replace(state, inverting=True) if isinstance(state, State) else State(inverting=True))
    return m
