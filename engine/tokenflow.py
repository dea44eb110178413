"""TokenFlow (Geyer et al., ICLR 2024) as a method of the engine: keyframe editing with nearest-neighbour
propagation of diffusion features. It runs its own steps (§3.2–3.3, Alg. 1); the math lives in
``attention/tokenflow.py``.

Per denoising step:
  1. one random keyframe per window of ``interval`` frames, re-drawn every step (``pick_keyframes``);
  2. source pass: the inverted source at this σ; every block's normed self-attention input is kept (NN field);
  3. keyframe pass: the keyframes only, with the attention applied before TokenFlow (else extended attention among
     them, §3.2 Eq. 3) and PnP injection; every block's self-attention output is kept;
  4. full pass: every frame; each block's self-attention output is replaced by the keyframe outputs gathered
     through the nearest-neighbour field of the source tokens and blended between the two nearest keyframes
     (Eq. 5; self-attention itself is never computed for the full pass). Its output is the step's result.
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
from ..attention.tokenflow import (PROPAGATION_MODES, pair_nearest_neighbour_field, pick_keyframes, propagate,
                                   propagation_weights)
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
        return SourceReads(tokens=self.attention_blocks)             # every block's tokens: the NN fields

    # ------------------------------------------------------------------------------------------ the step
    def keyframes(self, frame_ids: tuple[int, ...], step: int) -> torch.Tensor:
        """Call positions of this step's keyframes, in frame-id order (a looped window lists frames 28..31, 0..3)."""
        keyframes = pick_keyframes(frame_ids, self.interval, self.seed, step)
        return keyframes[torch.argsort(torch.tensor([frame_ids[i] for i in keyframes.tolist()]))]

    def drive_step(self, step: "Step") -> list:
        """The step's passes in frame batches: each batch runs one source pass over its frames and the keyframes
        it newly needs, the keyframe pass of each new group of keyframes, then its full pass, which propagates from
        the keyframes it needs. One batch of every frame is TokenFlow's single pass over the whole video."""
        run = step.run
        frames = step.frames
        keyframes = self.keyframes(run.frame_ids, run.step)                              # (K,) positions
        pair, weights = propagation_weights(run.frame_ids, [run.frame_ids[i] for i in keyframes.tolist()],
                                            self.mode, self.interval)
        kept = run.method_state[id(self)] = KeyframeStep(keyframes, pair, weights)
        order = sorted(range(frames), key=run.frame_ids.__getitem__)                    # by frame id
        size = run.stack.windows.size_for(frames)
        frame_batches = [sorted(order[i] for i in batch) for batch in frame_windows.batches(frames, size)]
        groups = KeyframeGroups(len(keyframes), len(keyframes) if len(frame_batches) == 1
                                else max(1, -(-size // self.interval)))
        blend = frame_windows.Blend(frames)
        try:
            for batch in frame_batches:
                positions = torch.tensor(batch, dtype=torch.long)
                needed = kept.needed(positions)
                keyframe_passes = groups.missing(needed)
                held = sorted(set(batch) | {int(keyframes[j]) for _, context in keyframe_passes for j in context})
                step.source_pass(None if len(held) == frames else torch.tensor(held, dtype=torch.long))
                for own, context in keyframe_passes:
                    step.run_pass(Pass.KEYFRAMES, keyframes[context])
                    kept.keep(own, context, run)
                out = step.run_pass(Pass.EDIT, None if len(frame_batches) == 1 else positions)
                if len(frame_batches) == 1:
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
        Any other pass: the attention below it."""
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
        return inner(q, k, v, extra_options)

    def propagated(self, run: "SamplingRun", kept: "KeyframeStep", key: BlockKey, extra_options: dict
                   ) -> torch.Tensor:
        """Eq. 5: the frame's tokens gathered from its two nearest keyframes through the NN field and blended."""
        if key not in run.source.tokens:
            raise RuntimeError(f"TokenFlow: the source pass left no tokens for block {key} at step {run.step}")
        if key not in kept.fields:              # once per batch and block, shared by split cond calls
            positions = torch.arange(len(run.frame_ids)) if run.pass_positions is None else run.pass_positions
            pair, weights = kept.pair[positions], kept.weights[positions]               # (B, 2) keyframe slots
            needed = torch.unique(pair)                                                  # (N,) ascending slots
            keyframe_source = torch.stack([kept.source[key][j] for j in needed.tolist()])   # (N, T, C)
            source = kept.with_keyframe_tokens(run.source_at_pass(run.source.tokens[key]), positions, needed,
                                               keyframe_source)                          # (B, T, C)
            pair = torch.searchsorted(needed, pair)
            field_ = pair_nearest_neighbour_field(source, keyframe_source, pair)
            kept.fields[key] = (field_, pair, weights, needed.tolist())
        field_, pair, weights, needed = kept.fields[key]
        keyframe_out = torch.stack([torch.stack([kept.out[(key, uuid)][j] for j in needed])
                                    for uuid in extra_options["uuids"]])              # (chunks, N, T, C)
        out = propagate(keyframe_out, field_, pair, weights)                           # (chunks, B, T, C)
        return out.reshape(-1, *out.shape[2:])

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
class KeyframeStep:
    """One step's keyframes and what their passes left: per block, each keyframe's source tokens (T, C); per
    (block, cond chunk), its self-attention output (T, C) — kept while a frame batch still needs the keyframe —
    and the current batch's NN fields."""
    keyframes: torch.Tensor                       # (K,) call positions, ascending in frame id
    pair: torch.Tensor                            # (F, 2) the two keyframe slots each frame blends
    weights: torch.Tensor                         # (F, 2)
    source: dict = field(default_factory=dict)    # block -> {slot: (T, C)}
    out: dict = field(default_factory=dict)       # (block, uuid) -> {slot: (T, C)}
    batch_out: dict = field(default_factory=dict)  # (block, uuid) -> (held, T, C): the keyframe pass now running
    fields: dict = field(default_factory=dict)    # block -> NN field of the current batch

    def needed(self, positions: torch.Tensor) -> torch.Tensor:
        """Slots of the keyframes the call ``positions`` blend, ascending."""
        return torch.unique(self.pair[positions])

    def keep(self, owned: list[int], context: list[int], run: "SamplingRun") -> None:
        """After the keyframe pass over the slots ``context``: keep the tokens of its ``owned`` slots."""
        rows = run.source_rows(self.keyframes[context])
        rows = torch.arange(len(context)) if rows is None else rows
        at = {j: i for i, j in enumerate(context)}
        for key, tokens in run.source.tokens.items():                                # (held, T, C)
            kept = self.source.setdefault(key, {})
            for j in owned:
                kept[j] = tokens[rows[at[j]]].clone()
        for key_uuid, out in self.batch_out.items():                                  # (len(context), T, C)
            kept = self.out.setdefault(key_uuid, {})
            for j in owned:
                kept[j] = out[at[j]].clone()
        self.batch_out.clear()

    def forget_before(self, slot: int) -> None:
        """Drop the keyframes before ``slot`` (later batches, later in the video, never need them)."""
        for kept in (*self.source.values(), *self.out.values()):
            for j in [j for j in kept if j < slot]:
                del kept[j]

    def with_keyframe_tokens(self, source: torch.Tensor, positions: torch.Tensor, needed: torch.Tensor,
                             keyframe_source: torch.Tensor) -> torch.Tensor:
        """``source`` (B, T, C) of the call ``positions``, with a needed keyframe's row replaced by the tokens its
        keyframe pass saw, so a keyframe maps to itself exactly (its own output tokens)."""
        slot_of = {int(k): j for j, k in enumerate(self.keyframes.tolist())}
        index = {j: n for n, j in enumerate(needed.tolist())}
        swap = [(r, index[slot_of[f]]) for r, f in enumerate(positions.tolist()) if slot_of.get(f) in index]
        if not swap or all(torch.equal(source[r], keyframe_source[n]) for r, n in swap):
            return source
        source = source.clone()
        for r, n in swap:
            source[r] = keyframe_source[n]
        return source


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
