"""TVE_ApplyTokenFlow: keyframe editing with nearest-neighbour propagation of diffusion features.

TokenFlow (Geyer et al., ICLR 2024), per denoising step (§3.2–3.3, Alg. 1):
  1. one random keyframe per window of ``interval`` frames, re-drawn every step;
  2. source pass: the inverted source at this σ; every block's normed self-attention input is kept (NN field);
  3. keyframe pass: the keyframes only, with extended attention among them and PnP injection; every block's
     self-attention output is kept;
  4. full pass: every frame; each block's self-attention output is replaced by the keyframe outputs gathered
     through the nearest-neighbour field of the source tokens and blended between the two nearest keyframes
     (self-attention itself is never computed for the full pass). Its output is the step's result.
The passes are run by the model's TVE state (``passes.py``), in frame batches of the model's frame windows (the
reference code's ``batch_size``): keyframes are drawn once per step on the whole video, the keyframe pass runs per
group of keyframes (each with the neighbouring groups' nearest keyframes as context), and each batch's full pass
propagates from the keyframes it needs; ``KeyframeStep`` keeps their tokens only while a batch needs them. Core
context windows, memory-split cond batches and every core sampler work unchanged, and ControlNet / T2I-Adapter
hints (stacks too) follow the keyframes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..attention.cross_frame import dense_attention, pick_keyframes
from ..attention.frames import frames_view
from ..attention.tokenflow import PROPAGATION_MODES, pair_nearest_neighbour_field, propagate, propagation_weights
from . import host, passes, sockets, validation
from .injection import injection_settings
from .inversion import Inversion

CATEGORY = "video editing/TVE"


@dataclass(frozen=True)
class TokenFlow:
    """TokenFlow's settings; its keyframe pass is run by the model's TVE state, its attention by ``attend``."""
    interval: int
    seed: int
    mode: str

    def keyframes(self, frame_ids: tuple[int, ...], step: int) -> torch.Tensor:
        """Local indices of this step's keyframes, in global-id order (a looped window lists frames 28..31, 0..3)."""
        keyframes = pick_keyframes(frame_ids, self.interval, self.seed, step)
        return keyframes[torch.argsort(torch.tensor([frame_ids[i] for i in keyframes.tolist()]))]

    def step_keyframes(self, frame_ids: Sequence[int], keyframes: torch.Tensor) -> "KeyframeStep":
        """The store of one step's keyframes (local indices ``keyframes``, by global id) and their blend (Eq. 5)."""
        pair, weights = propagation_weights(frame_ids, [frame_ids[i] for i in keyframes.tolist()], self.mode,
                                            self.interval)
        return KeyframeStep(keyframes, pair, weights)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict, run: passes.Run,
               key: passes.BlockKey, inner: Any) -> torch.Tensor:
        """KEYFRAMES: the attention applied before TokenFlow (else extended attention among the keyframes, §3.2
        Eq. 3), outputs kept per cond chunk. EDIT: the propagated keyframe outputs (self-attention is not run)."""
        if run.pass_ is passes.Pass.KEYFRAMES:
            if inner is not None:
                out = inner.attend(q, k, v, extra_options) if isinstance(inner, passes.AttentionFeature) \
                    else inner(q, k, v, extra_options)
            else:
                out = dense_attention(q, k, v, extra_options["n_heads"], len(extra_options["cond_or_uncond"]),
                                      attention=lambda q_, k_, v_, h_: host.optimized_attention(q_, k_, v_, h_,
                                                                                                extra_options))
            for uuid, chunk in zip(extra_options["uuids"], frames_view(out, len(extra_options["uuids"]))):
                run.features.keyframe_out[(key, uuid)] = chunk                            # (K, T, C)
            return out
        return self.propagated(run, key, extra_options).to(q.dtype)

    def propagated(self, run: passes.Run, key: passes.BlockKey, extra_options: dict) -> torch.Tensor:
        """Eq. 5: the frame's tokens gathered from its two nearest keyframes through the NN field and blended."""
        features, step = run.features, run.tokenflow
        if key not in features.source_tokens:
            raise RuntimeError(f"TokenFlow: the source pass left no tokens for block {key} at step {run.step}")
        if key not in features.fields:              # once per batch and block, shared by split cond calls
            local = torch.arange(len(run.frame_ids)) if run.pass_frames is None else run.pass_frames
            pair, weights = step.pair[local], step.weights[local]                   # (B, 2) keyframe positions
            needed = torch.unique(pair)                                              # (N,) ascending
            keyframe_source = torch.stack([step.source[key][j] for j in needed.tolist()])   # (N, T, C)
            source = step.with_keyframe_tokens(run.source_frames(features.source_tokens[key]), local, needed,
                                               keyframe_source)                      # (B, T, C)
            pair = torch.searchsorted(needed, pair)
            field_ = pair_nearest_neighbour_field(source, keyframe_source, pair)
            features.fields[key] = (field_, pair, weights, needed.tolist())
        field_, pair, weights, needed = features.fields[key]
        keyframe_out = torch.stack([torch.stack([step.out[(key, uuid)][j] for j in needed])
                                    for uuid in extra_options["uuids"]])          # (chunks, N, T, C)
        out = propagate(keyframe_out, field_, pair, weights)                       # (chunks, B, T, C)
        return out.reshape(-1, *out.shape[2:])


@dataclass
class KeyframeGroups:
    """Keyframe positions 0..count-1 in groups of ``size``. A keyframe pass runs the new groups a frame batch needs
    (consecutive ones together) with the neighbouring groups' nearest keyframes as context, so neighbouring groups
    attended to each other and no seam shows."""
    count: int
    size: int
    done: set = field(default_factory=set)

    def missing(self, needed: torch.Tensor) -> list[tuple[list[int], list[int]]]:
        """(own positions, positions held) of each keyframe pass the positions ``needed`` still lack (marked as
        run): a run of consecutive new groups is one pass."""
        groups = sorted({j // self.size for j in needed.tolist()} - self.done)
        self.done.update(groups)
        runs: list[list[int]] = []
        for g in groups:
            if runs and runs[-1][-1] == g - 1:
                runs[-1].append(g)
            else:
                runs.append([g])
        passes_ = []
        for run in runs:
            own = list(range(run[0] * self.size, min((run[-1] + 1) * self.size, self.count)))
            held = [j for j in (own[0] - 1, *own, own[-1] + 1) if 0 <= j < self.count]
            passes_.append((own, held))
        return passes_


@dataclass
class KeyframeStep:
    """One step's keyframes and what their passes left: per block, each keyframe's source tokens (T, C); per
    (block, cond chunk), its self-attention output (T, C) — kept while a frame batch still needs the keyframe."""
    keyframes: torch.Tensor                       # (K,) local indices, ascending in global id
    pair: torch.Tensor                            # (F, 2) the two keyframe positions each frame blends
    weights: torch.Tensor                         # (F, 2)
    source: dict = field(default_factory=dict)    # block -> {position: (T, C)}
    out: dict = field(default_factory=dict)       # (block, uuid) -> {position: (T, C)}

    def groups(self, size: int) -> KeyframeGroups:
        return KeyframeGroups(len(self.keyframes), max(1, size))

    def needed(self, local: torch.Tensor) -> torch.Tensor:
        """Positions of the keyframes the frames ``local`` blend, ascending."""
        return torch.unique(self.pair[local])

    def keep(self, owned: list[int], context: list[int], run: passes.Run) -> None:
        """After the keyframe pass over ``context``: keep the tokens of its ``owned`` keyframes, drop the rest."""
        features = run.features
        rows = run.source_rows(self.keyframes[context])
        at = {j: i for i, j in enumerate(context)}
        for key, tokens in features.source_tokens.items():                         # (held, T, C)
            kept = self.source.setdefault(key, {})
            for j in owned:
                kept[j] = tokens[rows[at[j]]].clone()
        for key_uuid, out in features.keyframe_out.items():                         # (len(context), T, C)
            kept = self.out.setdefault(key_uuid, {})
            for j in owned:
                kept[j] = out[at[j]].clone()
        features.keyframe_out.clear()

    def forget_before(self, position: int) -> None:
        """Drop the keyframes before ``position`` (later batches, later in the video, never need them)."""
        for kept in (*self.source.values(), *self.out.values()):
            for j in [j for j in kept if j < position]:
                del kept[j]

    def with_keyframe_tokens(self, source: torch.Tensor, local: torch.Tensor, needed: torch.Tensor,
                             keyframe_source: torch.Tensor) -> torch.Tensor:
        """``source`` (B, T, C) of the frames ``local``, with a needed keyframe's row replaced by the tokens its
        keyframe pass saw, so a keyframe maps to itself exactly (its own output tokens)."""
        position = {int(k): j for j, k in enumerate(self.keyframes.tolist())}
        index = {j: n for n, j in enumerate(needed.tolist())}
        swap = [(r, index[position[f]]) for r, f in enumerate(local.tolist()) if position.get(f) in index]
        if not swap or all(torch.equal(source[r], keyframe_source[n]) for r, n in swap):
            return source
        source = source.clone()
        for r, n in swap:
            source[r] = keyframe_source[n]
        return source


def apply_tokenflow(model: Any, inversion: Inversion, interval: int, seed: int, mode: str, attn_end: float,
                    conv_end: float) -> Any:
    """TokenFlow on a clone of ``model``, with PnP injection (TokenFlow's preset) of these settings."""
    validation.model(model)
    validation.integer(interval, "keyframe_interval", 1)
    validation.integer(seed, "seed", 0)
    validation.choice(mode, "propagation", PROPAGATION_MODES)
    validation.number(attn_end, "attention_injection_end", 0.0, 1.0)
    validation.number(conv_end, "conv_injection_end", 0.0, 1.0)
    injection = injection_settings(model, inversion, "tokenflow", attn_end, conv_end, "sigma-matched",
                                   node=passes.TOKENFLOW_NODE)
    tokenflow = TokenFlow(interval, seed, mode)
    return passes.apply(model, lambda state: state.with_tokenflow(tokenflow, injection))


class ApplyTokenFlow:
    DESCRIPTION = ("TokenFlow: edits random keyframes jointly each step and carries their self-attention outputs to "
                   "every frame along nearest-neighbour correspondences of the source video's features, with PnP "
                   "injection. Sample the inverted latent on the inversion's σ grid (SamplerCustomAdvanced with "
                   "DisableNoise and the inversion's SIGMAS). Apply it after FLATTEN or cross-frame attention; "
                   "ControlNet and T2I-Adapter hints follow the keyframes.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": (
                "The model you edit with (patch FLATTEN or cross-frame attention first if you stack them).")}),
            "inversion": (sockets.INVERSION, {"tooltip": "From DDIM Inversion (TVE) of the same frames, with this model."}),
            "keyframe_interval": ("INT", {"default": 8, "min": 1, "max": 1024,
                                          "tooltip": "One keyframe per this many frames (re-drawn every step)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": False,
                             "tooltip": "Seeds the keyframe draw (re-drawn every step). Fixed: it does not re-roll on "
                                        "every queue, so the inversion and the edit are not re-run."}),
            "propagation": (list(PROPAGATION_MODES), {"default": "paper", "tooltip": (
                "paper: blend the two keyframes nearest in time, linear in their distance. official: the reference "
                "code's rule (current and previous window, sigmoid weights).")}),
            "attention_injection_end": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "Fraction of the steps with PnP q/k injection in the keyframe pass (more keeps more of the source "
                "layout).")}),
            "conv_injection_end": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "Fraction of the steps with PnP ResBlock feature injection in the keyframe pass.")}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, inversion: Inversion, keyframe_interval: int, seed: int, propagation: str,
              attention_injection_end: float, conv_injection_end: float):
        sockets.expect(inversion, Inversion, "inversion", sockets.INVERSION)
        return (apply_tokenflow(model, inversion, keyframe_interval, seed, propagation, attention_injection_end,
                                conv_injection_end),)


NODES = {"TVE_ApplyTokenFlow": (ApplyTokenFlow, "Apply TokenFlow (TVE)")}
