"""The TVE methods on one MODEL and how they compose: the ``MethodStack`` (immutable settings), attached to each clone
a TVE node returns, with one set of keyed wrappers and routers that run it (``passes.py``).

Each node that patches a MODEL adds its method with ``apply``: the method first checks it may follow the methods
already there (``Method.check_added_after`` raises ``Refused`` naming both nodes and the order that works), then
takes the place of any earlier method it ``replaces`` (the later settings win; ``apply`` returns a note saying so).
Nothing is half-applied: the stack is built and checked before the clone is patched. The stack itself knows no
method by name: every rule is the methods' own.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from . import host, identity, passes, validation
from .frame_windows import FrameWindows
from .masked_source import MaskedSource
from .methods import BlockKey, Method, Refused, SourceReads


@dataclass(frozen=True)
class MethodStack:
    """The TVE methods of one MODEL in the order applied, the frame windows of its passes, and the other packs'
    self-attention replaces TVE routes around. Immutable: each node attaches a new one to its clone."""
    methods: tuple[Method, ...] = ()
    windows: FrameWindows = FrameWindows()
    windows_set: bool = False                     # a Frame Windows (TVE) node set ``windows`` (else the default)
    foreign: Mapping[BlockKey, Callable] = field(default_factory=dict)
    inverting: bool = False                       # a clone DDIM Inversion (TVE) inverts with: every call INVERSION
    source_exit: bool = True                      # source passes end after the last feature read (Step.source_end)
    recording: Any = None                         # inverting: the StoredSource its calls fill (stored_source.py)
    notes: tuple[str, ...] = field(default=(), compare=False)   # what the node that made it replaced, to show it

    # ------------------------------------------------------------------------------------------ what it holds
    @property
    def inversion(self) -> Any:
        """The one INVERSION the methods read (their source pass), or None."""
        return next((m.inversion for m in self.methods if m.inversion is not None), None)

    @property
    def source_order(self) -> str:
        """The order of the method that reads the inversion (one per model)."""
        return next((m.source_order for m in self.methods if m.inversion is not None), "sigma-matched")

    def sources(self) -> list:
        """Every INVERSION and TRAJECTORIES of the methods, in the order applied, each once."""
        found: dict[int, Any] = {}
        for m in self.methods:
            for source in m.sources():
                found.setdefault(id(source), source)
        return list(found.values())

    def attention_chain(self, key: BlockKey) -> list[Method]:
        """The methods that compute self-attention on block ``key``, in the order applied (the last one runs, with
        the ones before it as its inner attention)."""
        return [m for m in self.methods if key in m.attention_blocks]

    @property
    def attention_blocks(self) -> frozenset:
        return frozenset().union(*(m.attention_blocks for m in self.methods))

    @property
    def attends_across_frames(self) -> bool:
        return any(m.attends_across_frames for m in self.methods)

    @property
    def step_driver(self) -> Method | None:
        """The method that runs whole steps itself (at most one), or None: the engine's windowed edit."""
        return next((m for m in self.methods if m.drives_step), None)

    def other_weights(self) -> tuple[identity.Node, bool]:
        """Whether the methods reading the inversion allow editing with other weights than it was made with: (the
        node that decides, allowed) — the first one that does not allow them, else the last one applied."""
        readers = [m for m in self.methods if m.inversion is not None]
        refusing = next((m for m in readers if not m.allow_other_weights), None)
        return (refusing or readers[-1]).node, refusing is None

    def source_reads(self, step: int, steps: int) -> SourceReads:
        reads = SourceReads()
        for m in self.methods:
            reads = reads | m.source_reads(step, steps)
        return reads

    def stored_source(self, model: Any, steps: int) -> Any:
        """What an inversion of ``steps`` steps made with this stack keeps for its edits (a StoredSource; one
        method at most asks), or None."""
        return next((s for s in (m.stored_source(model, steps) for m in self.methods) if s is not None), None)

    def has(self, node: identity.Node) -> bool:
        return any(m.node == node for m in self.methods)

    # ------------------------------------------------------------------------------------------ composition
    def adding(self, method: Method) -> tuple["MethodStack", list[Method]]:
        """This stack with ``method`` last, and the earlier methods it replaced; Refused if it may not follow."""
        method.check_added_after(self)
        for earlier in self.methods:
            earlier.check_follower(method)
        if method.inversion is not None:             # one source pass per step: one inversion per model
            other = next((m for m in self.methods if m.inversion not in (None, method.inversion)), None)
            if other is not None:
                raise Refused(f"{method.node} after {other.node}: they read different inversions, but a model runs "
                              "one source pass per step; connect the same DDIM Inversion (TVE) output to both.")
        if method.inversion is not None and method.inversion.stored is not None:
            method.inversion.stored.check_reader(method, method.inversion.steps)
        replaced = [m for m in self.methods if method.replaces(m)]
        stack = dataclasses.replace(self, methods=tuple(m for m in self.methods if m not in replaced) + (method,),
                                    notes=())
        stack.check_windows()
        return stack, replaced

    def with_windows(self, windows: FrameWindows) -> "MethodStack":
        """The frames per pass of every TVE pass of this model (any order on the chain; the later node wins, and
        its notes say so)."""
        notes = ()
        if self.windows_set:
            notes = (f"{identity.FRAME_WINDOWS}: applied again; these settings ({windows.describe()}) replace the "
                     f"earlier ones ({self.windows.describe()}): one per model, the later node's win",)
        stack = dataclasses.replace(self, windows=windows, windows_set=True, notes=notes)
        stack.check_windows()
        return stack

    def check_windows(self) -> None:
        """A method that attends across frames needs windows of at least two frames."""
        if self.windows.size == 1:
            mixing = next((m for m in self.methods if m.attends_across_frames), None)
            if mixing is not None:
                raise Refused(f"frames_per_window: 1 frame per window leaves {mixing.node} nothing to attend to "
                              "across frames; set at least 2 (or 0: all frames in one pass)")

    def check_context_windows(self, context_length: int | None) -> None:
        """Before the first step: a core Context Windows node (``context_length`` frames a window; None: none) holds
        at least two frames a window where a method attends across frames."""
        if context_length is not None and context_length < 2:
            mixing = next((m for m in self.methods if m.attends_across_frames), None)
            if mixing is not None:
                raise Refused(f"context_length: core's Context Windows node gives every call {context_length} frame, "
                              f"which leaves {mixing.node} nothing to attend to across frames; set at least 2 "
                              "(or leave the windowing to Frame Windows (TVE))")

    def check_new_frames(self, node: identity.Node) -> None:
        """``node`` samples new frames from noise: no method tied to a source video may be on its model."""
        for m in self.methods:
            if m.ties_to_a_video():
                raise Refused(f"{node} after {m.node}: it samples new frames from noise, which the source video "
                              f"{m.node} reads does not describe. Give {node} the model from before {m.node}, "
                              f"and apply {m.node} to the model that samples its latents.")


# ---------------------------------------------------------------------------------------------- on a MODEL
def stack_of(model: Any) -> MethodStack:
    """The TVE methods on ``model`` (an empty stack if no TVE node patched it)."""
    stack = host.get_attachment(model)
    return stack if isinstance(stack, MethodStack) else MethodStack()


def apply(model: Any, *methods: Method) -> Any:
    """A clone of ``model`` with ``methods`` added to its stack in order; the stack's ``notes`` say what of earlier
    nodes they replaced, and where the artist allowed other weights than the inversion's (the node shows them). A
    Refused, or a model of other weights than an inversion a method reads was made with, leaves nothing patched."""
    stack, notes = stack_of(model), []
    for method in methods:
        check_no_hidden_attention(model, method)
        before = stack
        stack, replaced = stack.adding(method)
        notes += [f"{method.node}: applied again; these settings replace the earlier ones" if m.node == method.node
                  else f"{method.node}: its {method.what} replace the {m.what} {m.node} set on this model (one per "
                       "model; the later node's win)" for m in replaced]
        notes += [_hidden_on_shared_blocks(method, m) for m in before.methods if m not in replaced
                  and not method.runs_inner_attention and m.attention_blocks & method.attention_blocks]
    notes += inversion_weights(model, methods)
    return install(model.clone(), dataclasses.replace(stack, notes=tuple(notes)))


def _hidden_on_shared_blocks(later: Method, earlier: Method) -> str:
    """The note of a method that computes self-attention (without its inner attention) on some of the blocks an
    earlier one does: there the later settings win."""
    shared, total = len(later.attention_blocks & earlier.attention_blocks), len(earlier.attention_blocks)
    if later.node == earlier.node:
        return (f"{later.node}: applied again; these settings replace the earlier ones on {shared} of the {total} "
                "blocks they were on (the later node's win per block)")
    return (f"{later.node}: its {later.what} replace the {earlier.what} {earlier.node} set on {shared} of its "
            f"{total} blocks (the later node's win per block)")


def inversion_weights(model: Any, methods: Sequence[Method]) -> list[str]:
    """When the node runs: ``model`` runs the weights every inversion ``methods`` read was made with (one
    ``host.weights_fingerprint``), else refused unless the method allows other weights; then the note to show
    (each difference once: an inversion says it once, here or when sampling starts)."""
    readers = [m for m in methods if m.inversion is not None]
    if not readers:
        return []
    current, notes = host.weights_fingerprint(model), []
    for m in readers:
        note = validation.inversion_weights(m.inversion, current, str(m.node), m.allow_other_weights)
        if note is not None and note not in notes:
            m.inversion.say_once(note)
            notes.append(note)
    return notes


def apply_frame_windows(model: Any, frames_per_window: int, overlap: int) -> Any:
    """Frame Windows (TVE): a clone of ``model`` whose TVE passes hold at most ``frames_per_window`` frames."""
    validation.model(model)
    windows = validation.frame_windows(frames_per_window, overlap)
    return install(model.clone(), stack_of(model).with_windows(windows))


def with_full_source_pass(model: Any) -> Any:
    """A clone of ``model`` whose source passes run the whole UNet (no early end): the same edit, bit for bit, and
    the reference the early end is tested and benchmarked against."""
    return install(model.clone(), dataclasses.replace(stack_of(model), source_exit=False, notes=()))


def for_inversion(model: Any, recording: Any = None) -> Any:
    """A clone of ``model`` whose TVE passes label every call INVERSION (no source or keyframe passes); with
    ``recording`` (a StoredSource) its calls keep the source features the inversion stores."""
    return install(model.clone(), dataclasses.replace(stack_of(model), inverting=True, recording=recording,
                                                      notes=()))


def check_no_hidden_attention(model: Any, method: Method) -> None:
    """A method that computes its own self-attention must not hide another pack's attn1 replace on its blocks
    (apply it first; a method that runs its inner attention, TokenFlow, runs such a replace)."""
    if method.runs_inner_attention:
        return
    foreign = sorted(key for key, fn in host.attn1_replaces(model).items()
                     if key in method.attention_blocks and fn is not passes.route_attention)
    if foreign:
        raise Refused(f"{method.node}: another node already replaced self-attention on {len(foreign)} blocks (e.g. "
                      f"{foreign[0]}), which {method.node} would hide. Apply {method.node} first, then that node.")


def install(model: Any, stack: MethodStack) -> Any:
    """Attach ``stack`` to the clone ``model`` with its wrappers and routers; returns ``model``."""
    replaces = host.attn1_replaces(model)
    routed = {key for key, fn in replaces.items() if fn is passes.route_attention}
    blocks = stack.attention_blocks
    foreign = dict(stack.foreign)
    for key, fn in replaces.items():
        if key in blocks and key not in routed and key not in foreign:
            foreign[key] = fn
    stack = dataclasses.replace(stack, foreign=foreign)
    validation.same_sources(stack.sources())
    if stack.inversion is not None:             # a masked run follows the source outside the mask
        host.set_inpaint_latent(model, MaskedSource(stack.inversion).latent_at)
    host.set_attn1_replace(model, passes.route_attention, sorted(blocks - routed))
    if any(m.inversion is not None for m in stack.methods) or stack.recording is not None:
        host.ensure_attn1_patch(model, passes.route_attention_input)
        host.set_unet_call_end(model)           # a source pass (or a call for stored features) ends early
    host.set_attachment(model, stack)
    host.set_wrapper(model, host.OUTER_SAMPLE, passes.outer_sample)
    host.set_wrapper(model, host.CALC_COND_BATCH, passes.calc_cond_batch)
    host.set_wrapper(model, host.APPLY_MODEL, passes.apply_model)
    return model
