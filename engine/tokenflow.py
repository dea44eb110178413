"""TokenFlow (Geyer et al., ICLR 2024) as a method of the engine: keyframe editing with nearest-neighbour
propagation of diffusion features. It runs its own steps (§3.2–3.3, Alg. 1); the math lives in
``attention/tokenflow.py``.

Per denoising step:
  1. one random keyframe per window of ``interval`` frames, re-drawn every step (``pick_keyframes``);
  2. source pass: the inverted source at this σ with per-frame attention; every block's normed self-attention input
     is kept (NN field) — over every frame (``paper``) or over the keyframes only (``official``: the keyframe pass's
     source branch, whose self-attention outputs are kept too);
  3. keyframe pass: the keyframes only, with the attention applied before TokenFlow (else extended attention among
     them, §3.2 Eq. 3) and PnP injection; every block's self-attention output is kept;
  4. full pass: every frame; each block's self-attention output is replaced by the keyframe outputs gathered
     through the nearest-neighbour field of the source tokens and blended between two keyframes (Eq. 5;
     self-attention itself is never computed for the full pass). Its output is the step's result. ``paper``: the
     fields of the per-frame source of step 2 and PnP's ResBlock feature from it. ``official`` (omerbt/TokenFlow's
     full pass, which propagates into all three chunks of its batch, the source chunk included): first the full
     pass's source branch runs as a source pass of every frame whose self-attention outputs are the keyframes'
     source outputs of step 2 propagated; each block's field is taken from that branch's own tokens there (so from
     the second block on, from the *propagated* source), and PnP injects that branch's ResBlock feature.
With frame windows (the reference code's ``batch_size``) the frames run in batches: keyframes are drawn once per step
on all of the call's frames, the keyframe pass runs per group of keyframes (each with the neighbouring groups'
nearest keyframes as context, so no seam shows), and each batch's full pass propagates from the keyframes it needs;
``KeyframeStep`` keeps their tokens only while a batch needs them. Core context windows, memory-split cond batches
and every core sampler work unchanged, and ControlNet / T2I-Adapter hints (stacks too) follow the keyframes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..attention.cross_frame import dense_attention
from ..attention.frames import frames_view
from ..attention.tokenflow import PROPAGATION_MODES, Propagation, pick_keyframes, propagation_weights
from . import frame_windows, host, identity, validation
from .injection import injection
from .methods import BlockKey, Method, Refused, SourceReads
from .run import Pass, SourceFeatures
from .stack import apply

if TYPE_CHECKING:
    from .inversion import Inversion
    from .passes import Step
    from .run import SamplingRun
    from .stack import MethodStack


@dataclass(frozen=True, eq=False)
class TokenFlow(Method):
    """TokenFlow's settings on every self-attention block of a model; it runs the model's steps."""
    interval: int
    seed: int
    mode: str
    attention_blocks: frozenset = field()
    inversion: "Inversion" = field()
    allow_other_weights: bool = False
    node = identity.TOKENFLOW
    runs_inner_attention = True
    drives_step = True

    def sources(self) -> list:
        return [self.inversion]

    def source_reads(self, step: int, steps: int) -> SourceReads:
        if self.propagates_source:        # the keyframes' source outputs are propagated, fields taken in that slot
            return SourceReads(tokens=self.attention_blocks, outputs=self.attention_blocks)
        return SourceReads(tokens=self.attention_blocks)             # every block's tokens: the NN fields

    # ------------------------------------------------------------------------------------------ the step
    def keyframes(self, frame_ids: tuple[int, ...], step: int) -> torch.Tensor:
        """Call positions of this step's keyframes, in frame-id order (a looped window lists frames 28..31, 0..3)."""
        keyframes = pick_keyframes(frame_ids, self.interval, self.seed, step)
        return keyframes[torch.argsort(torch.tensor([frame_ids[i] for i in keyframes.tolist()]))]

    @property
    def propagates_source(self) -> bool:
        """Whether the full pass's source branch is propagated too (the official code) rather than a per-frame
        source pass (``paper``)."""
        return self.mode == "official"

    def drive_step(self, step: "Step") -> list:
        """The step's passes in frame batches; one batch of every frame is TokenFlow's single pass over the whole
        video. ``paper``: each batch runs one per-frame source pass over its frames and the keyframes it newly
        needs, the keyframe pass of each new group of keyframes, then its full pass, which propagates from the
        keyframes it needs with fields of the per-frame source. ``official``: the per-frame source pass holds only
        the new keyframes (the keyframe pass's source branch); the full pass's source branch then runs as its own
        source pass, propagated from the keyframes' per-frame source outputs, and leaves the fields (and the
        ResBlock features PnP injects) the full pass reads."""
        run = step.run
        frames = step.frames
        keyframes = self.keyframes(run.frame_ids, run.step)                              # (K,) positions
        pair, weights = propagation_weights(run.frame_ids, [run.frame_ids[i] for i in keyframes.tolist()],
                                            self.mode, self.interval)
        kept = run.method_state[id(self)] = KeyframeStep(keyframes, pair, weights)
        order = sorted(range(frames), key=run.frame_ids.__getitem__)                    # by frame id
        size = run.stack.windows.size_for(frames)
        frame_batches = [sorted(order[i] for i in batch) for batch in frame_windows.batches(frames, size)]
        whole = len(frame_batches) == 1
        groups = KeyframeGroups(len(keyframes), len(keyframes) if whole else max(1, -(-size // self.interval)))
        blend = frame_windows.Blend(frames)
        try:
            for batch in frame_batches:
                positions = torch.tensor(batch, dtype=torch.long)
                needed = kept.needed(positions)
                keyframe_passes = groups.missing(needed)
                context = {int(keyframes[j]) for _, held in keyframe_passes for j in held}
                held = sorted(context) if self.propagates_source else sorted(set(batch) | context)
                if held:
                    step.source_pass(None if len(held) == frames else torch.tensor(held, dtype=torch.long))
                    kept.source_passes += 1
                for own, held_slots in keyframe_passes:
                    step.run_pass(Pass.KEYFRAMES, keyframes[held_slots])
                    kept.keep(own, held_slots, run)
                kept.source_batch_out.clear()
                kept.batch = kept.frame_batch(None if whole else positions, frames, step.x_in.device)
                if self.propagates_source:
                    kept.propagating_source = True
                    try:
                        step.source_pass(None if whole else positions)
                    finally:
                        kept.propagating_source = False
                out = step.run_pass(Pass.EDIT, None if whole else positions)
                if whole:
                    return out
                kept.forget_before(int(needed.min()))
                kept.fields.clear()
                run.source = SourceFeatures()
                blend.add(frame_windows.Window(positions, torch.ones(len(batch))), out)
            return blend.result(step.x_in.dtype)
        finally:
            del run.method_state[id(self)]

    # ------------------------------------------------------------------------------------------ attention
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict, run: "SamplingRun",
               inner: Any) -> torch.Tensor:
        """KEYFRAMES: the attention applied before TokenFlow (else extended attention among the keyframes, §3.2
        Eq. 3), outputs kept per cond chunk. EDIT: the propagated keyframe outputs (self-attention is not run).
        SOURCE, ``official``: in the full pass's source branch, the propagated keyframe source outputs; in the
        per-frame source pass, the attention below it, kept for the keyframes. Any other pass: the attention below
        it."""
        key = host.block_key(extra_options)
        kept = run.method_state.get(id(self))
        if run.pass_ is Pass.KEYFRAMES:
            if run.stack.attention_chain(key)[:-1] or key in run.stack.foreign:
                out = inner(q, k, v, extra_options)
            else:
                out = dense_attention(q, k, v, extra_options["n_heads"], len(extra_options["cond_or_uncond"]),
                                      attention=lambda q_, k_, v_, h_: host.optimized_attention(q_, k_, v_, h_,
                                                                                                extra_options))
            for uuid, chunk in zip(extra_options["uuids"], frames_view(out, len(extra_options["uuids"]))):
                kept.batch_out[(key, uuid)] = chunk                                       # (K, T, C)
            return out
        if run.pass_ is Pass.EDIT:
            return self.propagated(run, kept, key, extra_options).to(q.dtype)
        if run.pass_ is Pass.SOURCE and kept is not None and self.propagates_source:
            if kept.propagating_source:
                return self.propagated_source(run, kept, key).to(q.dtype)
            out = inner(q, k, v, extra_options)
            kept.source_batch_out[key] = out                                              # (held, T, C)
            return out
        return inner(q, k, v, extra_options)

    def propagated(self, run: "SamplingRun", kept: "KeyframeStep", key: BlockKey, extra_options: dict
                   ) -> torch.Tensor:
        """Eq. 5: the frame's tokens gathered from its two nearest keyframes through the NN field and blended;
        the field of the per-frame source (``paper``, computed here once per batch and block, shared by split cond
        calls) or the one the propagated source branch left (``official``)."""
        batch = kept.batch
        if key not in kept.fields:
            if self.propagates_source:
                raise RuntimeError(f"TokenFlow: the propagated source pass left no field for block {key} at step "
                                   f"{run.step}")
            if key not in run.source.tokens:
                raise RuntimeError(f"TokenFlow: the source pass left no tokens for block {key} at step {run.step}")
            keyframe_source = kept.stacked(kept.source, key, batch.needed)              # (N, T, C)
            source = batch.with_keyframe_tokens(run.source_at_pass(run.source.tokens[key]), keyframe_source)
            kept.fields[key] = batch.propagation.field(source, keyframe_source)         # (B, 2, T)
        keyframe_out = torch.stack([kept.stacked(kept.out, (key, uuid), batch.needed)
                                    for uuid in extra_options["uuids"]])               # (chunks, N, T, C)
        out = batch.propagation.blend(keyframe_out, kept.fields[key])                  # (chunks, B, T, C)
        return out.reshape(-1, *out.shape[2:])

    def propagated_source(self, run: "SamplingRun", kept: "KeyframeStep", key: BlockKey) -> torch.Tensor:
        """The official full pass's source branch (``tokenflow_utils.py``, the non-pivotal pass of the TokenFlow
        block): the field of this branch's own normed tokens to the keyframes' per-frame source tokens, kept for
        the edit's chunks, and the keyframes' per-frame source outputs gathered through it and blended (Eq. 5)."""
        batch = kept.batch
        if key not in run.source.tokens:
            raise RuntimeError(f"TokenFlow: the source pass left no tokens for block {key} at step {run.step}")
        keyframe_source = kept.stacked(kept.source, key, batch.needed)                  # (N, T, C)
        field_ = kept.fields[key] = batch.propagation.field(run.source.tokens[key], keyframe_source)   # (B, 2, T)
        keyframe_out = kept.stacked(kept.source_out, key, batch.needed)[None]            # (1, N, T, C)
        return batch.propagation.blend(keyframe_out, field_)[0]                         # (B, T, C)

    # ------------------------------------------------------------------------------------------ composition
    def check_added_after(self, stack: "MethodStack") -> None:
        anchored = next((m for m in stack.methods if m.attends_to_a_fixed_frame), None)
        if anchored is not None:
            raise Refused(f"{self.node} after {anchored.node} mode 'anchor': TokenFlow's keyframe pass holds only "
                          "the keyframes, so the anchor frame is not there to attend to. Use mode 'keyframes', "
                          "'dense' or 'fine_coarse' before TokenFlow, or anchor attention without TokenFlow.")

    def check_follower(self, later: Method) -> None:
        """TokenFlow replaces every self-attention output of the edit, so attention applied after it never runs."""
        if later.attention_blocks and not later.runs_inner_attention:
            raise Refused(f"{later.node} after {self.node}: TokenFlow replaces every self-attention output of the "
                          f"edit with propagated keyframe tokens, so nothing applied after it would run. Apply "
                          f"{later.node} first, then {self.node} (it then drives the keyframe pass).")


@dataclass
class KeyframeGroups:
    """Keyframe slots 0..count-1 in groups of ``size``. A keyframe pass runs the new groups a frame batch needs
    (consecutive ones together) with the neighbouring groups' nearest keyframes as context, so neighbouring groups
    attended to each other and no seam shows."""
    count: int
    size: int
    done: set = field(default_factory=set)

    def missing(self, needed: torch.Tensor) -> list[tuple[list[int], list[int]]]:
        """(own slots, slots held) of each keyframe pass the slots ``needed`` still lack (marked as run): a run
        of consecutive new groups is one pass."""
        groups = sorted({j // self.size for j in needed.tolist()} - self.done)
        self.done.update(groups)
        runs: list[list[int]] = []
        for g in groups:
            if runs and runs[-1][-1] == g - 1:
                runs[-1].append(g)
            else:
                runs.append([g])
        passes = []
        for run in runs:
            own = list(range(run[0] * self.size, min((run[-1] + 1) * self.size, self.count)))
            held = [j for j in (own[0] - 1, *own, own[-1] + 1) if 0 <= j < self.count]
            passes.append((own, held))
        return passes


@dataclass
class FrameBatch:
    """What a frame batch's full pass reads, laid out on the step's device once per batch (no block reads a value
    on the host): the keyframes it blends and its propagation, and which of its rows are those keyframes."""
    needed: list[int]                             # slots of the keyframes it blends, ascending
    propagation: Propagation                      # pair indexes ``needed``
    keyframe_rows: torch.Tensor                   # (S,) rows of the batch that are keyframes it blends
    keyframe_index: torch.Tensor                  # (S,) their index into ``needed``

    def with_keyframe_tokens(self, source: torch.Tensor, keyframe_source: torch.Tensor) -> torch.Tensor:
        """``source`` (B, T, C) with a keyframe's row replaced by the tokens its keyframe pass saw (N, T, C), so
        a keyframe maps to itself exactly (its own output tokens); only the keyframes whose tokens were kept from
        an earlier per-frame source pass than this batch's (the others are those very tokens)."""
        if not self.keyframe_rows.shape[0]:
            return source
        return source.index_copy(0, self.keyframe_rows, keyframe_source[self.keyframe_index])


@dataclass
class KeyframeStep:
    """One step's keyframes and what their passes left: per block, each keyframe's source tokens (T, C) and, for
    ``official``, its per-frame source self-attention output (T, C); per (block, cond chunk), its self-attention
    output (T, C) — kept while a frame batch still needs the keyframe — and the current batch's NN fields."""
    keyframes: torch.Tensor                       # (K,) call positions, ascending in frame id
    pair: torch.Tensor                            # (F, 2) the two keyframe slots each frame blends
    weights: torch.Tensor                         # (F, 2)
    source: dict = field(default_factory=dict)    # block -> {slot: (T, C)}
    source_out: dict = field(default_factory=dict)  # block -> {slot: (T, C)} (official)
    out: dict = field(default_factory=dict)       # (block, uuid) -> {slot: (T, C)}
    batch_out: dict = field(default_factory=dict)  # (block, uuid) -> (held, T, C): the keyframe pass now running
    source_batch_out: dict = field(default_factory=dict)  # block -> (held, T, C): the per-frame source pass's
    fields: dict = field(default_factory=dict)    # block -> NN field of the current batch
    batch: FrameBatch | None = None               # the frame batch whose full pass runs next
    source_passes: int = 0                        # per-frame source passes run so far this step
    kept_from: dict = field(default_factory=dict)  # slot -> the per-frame source pass its tokens were kept from
    propagating_source: bool = False              # the source pass now running is the full pass's source branch

    def needed(self, positions: torch.Tensor) -> torch.Tensor:
        """Slots of the keyframes the call ``positions`` blend, ascending."""
        return torch.unique(self.pair[positions])

    def frame_batch(self, positions: torch.Tensor | None, frames: int, device: torch.device) -> FrameBatch:
        """The full pass over call ``positions`` (None: all ``frames``), laid out on ``device``."""
        positions = torch.arange(frames) if positions is None else positions
        pair, weights = self.pair[positions], self.weights[positions]                   # (B, 2) keyframe slots
        needed = torch.unique(pair)                                                      # (N,) ascending slots
        propagation = Propagation.of(torch.searchsorted(needed, pair), weights, len(needed), device)
        slot_of = {int(k): j for j, k in enumerate(self.keyframes.tolist())}
        index = {j: n for n, j in enumerate(needed.tolist())}
        swap = [(r, index[slot_of[f]]) for r, f in enumerate(positions.tolist())
                if slot_of.get(f) in index and self.kept_from[slot_of[f]] != self.source_passes]   # else the same
        rows = torch.tensor([r for r, _ in swap], dtype=torch.long).to(device)
        return FrameBatch(needed.tolist(), propagation, rows,
                          torch.tensor([n for _, n in swap], dtype=torch.long).to(device))

    @staticmethod
    def stacked(kept: dict, key: Any, slots: list[int]) -> torch.Tensor:
        """The kept tensors of ``slots`` under ``key``, stacked: (len(slots), T, C)."""
        return torch.stack([kept[key][j] for j in slots])

    def keep(self, owned: list[int], context: list[int], run: "SamplingRun") -> None:
        """After the keyframe pass over the slots ``context``: keep the tokens of its ``owned`` slots."""
        rows = run.source_rows(self.keyframes[context])
        rows = torch.arange(len(context)) if rows is None else rows
        at = {j: i for i, j in enumerate(context)}
        self.kept_from.update({j: self.source_passes for j in owned})
        for store, features in ((self.source, run.source.tokens), (self.source_out, self.source_batch_out)):
            for key, tokens in features.items():                                      # (held, T, C)
                kept = store.setdefault(key, {})
                for j in owned:
                    kept[j] = tokens[rows[at[j]]].clone()
        for key_uuid, out in self.batch_out.items():                                  # (len(context), T, C)
            kept = self.out.setdefault(key_uuid, {})
            for j in owned:
                kept[j] = out[at[j]].clone()
        self.batch_out.clear()

    def forget_before(self, slot: int) -> None:
        """Drop the keyframes before ``slot`` (later batches, later in the video, never need them)."""
        for kept in (*self.source.values(), *self.source_out.values(), *self.out.values()):
            for j in [j for j in kept if j < slot]:
                del kept[j]


def apply_tokenflow(model: Any, inversion: "Inversion", interval: int, seed: int, mode: str, attn_end: float,
                    conv_end: float, allow_other_weights: bool = False) -> Any:
    """TokenFlow on a clone of ``model``, with PnP injection (TokenFlow's preset) of these settings; other weights
    than the inversion's only with ``allow_other_weights``."""
    validation.model(model)
    validation.integer(interval, "keyframe_interval", 1)
    validation.integer(seed, "seed", 0)
    validation.choice(mode, "propagation", PROPAGATION_MODES)
    pnp = injection(model, inversion, "tokenflow", attn_end, conv_end, "sigma-matched", node=identity.TOKENFLOW,
                    allow_other_weights=allow_other_weights)
    blocks = frozenset(b.key for b in host.attention_blocks(model))
    return apply(model, pnp, TokenFlow(interval, seed, mode, blocks, inversion, allow_other_weights))
