"""FLATTEN's stored source features (the official code's, ``pipeline_flatten.py``): the inversion keeps what PnP
injection reads, and the edit replays it instead of running a live source pass each step.

DDIM Inversion (TVE), inverting with a FLATTEN model whose ``source_features`` is ``stored``, keeps the features
FLATTEN's PnP preset reads (each injected block's self-attention input n, q = to_q(n) and k = to_k(n) in Eq. 4 of
Tumanyan et al. 2023; each injected ResBlock's branch output) of the model's call on the source latent x_i at σ_i,
for the first ``steps`` σ of the sampling grid, per frame window. That is the call a live source pass makes at σ_i
(same latent, σ, conditioning, attention and frame-pooled norms over the same frames), so the edit reads the same
numbers without a UNet call. With ``formula: current_sigma`` the inversion's own step at σ_i is that call (FLATTEN's
code saves its features there); with ``next_sigma`` (ε at σ_{i+1}) and at the top σ, where no step evaluates
(x_i, σ_i), one more call per stored σ computes them, ending after the last feature kept.

Memory: the kept features of every stored step and frame window, on the host's intermediate device (the CPU),
in the model's dtype; ``describe`` says how much, per frame.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch

from . import host
from .methods import Refused, SourceReads, resblock_point, tokens_point
from .run import SourceFeatures

if TYPE_CHECKING:
    from .methods import BlockKey, Method, ReadPoint

MIB = 1 << 20


@dataclass(eq=False)
class StoredSource:
    """The source features an inversion keeps for its edits: ``reads`` at grid steps 0 .. ``steps``−1, per frame
    window. Filled while the inversion runs (``recording``), read-only after it."""
    reads: SourceReads                     # what is kept: self-attention inputs (tokens), ResBlock branches
    steps: int                             # grid steps kept, from the top σ: 0 .. steps − 1
    # (grid step, frame ids of the pass) -> SourceFeatures on the intermediate device
    kept: dict = field(default_factory=dict, repr=False)
    recording: int | None = None           # grid step whose features the UNet call now running gives (inversion)
    ends_call: bool = False                # that call is made for the features only: end it after the last one
    pending: dict = field(default_factory=dict, repr=False)   # this call's features, on the device, per frame ids

    # ------------------------------------------------------------------------------------------ while inverting
    @contextlib.contextmanager
    def recording_at(self, grid_step: int, features_only: bool) -> Iterator[None]:
        """During one model call of the inversion: keep its features as grid step ``grid_step``'s; a call made
        ``features_only`` ends after the last feature kept. Afterwards the call's features move to the
        intermediate device in one go (no device->host copy per block)."""
        self.recording, self.ends_call, self.pending = grid_step, features_only, {}
        try:
            yield
            keep = host.intermediate_device()
            for frame_ids, features in self.pending.items():
                self.kept[(grid_step, frame_ids)] = SourceFeatures(
                    tokens={k: t.detach().to(keep) for k, t in features.tokens.items()},
                    resblocks={i: h.detach().to(keep) for i, h in features.resblocks.items()})
        finally:
            self.recording, self.ends_call, self.pending = None, False, {}

    def keep_tokens(self, frame_ids: tuple[int, ...], key: "BlockKey", n: torch.Tensor) -> None:
        """While recording, keep block ``key``'s self-attention input of the pass over ``frame_ids`` if it is kept
        (its first CFG chunk: the inversion runs at guidance 1, every chunk holds the source conditioning)."""
        if self.recording is not None and key in self.reads.tokens:
            self._keep(frame_ids).tokens[key] = n[:len(frame_ids)]                   # (F, T, C)
            self._end_call_after(tokens_point(key))

    def keep_resblock(self, frame_ids: tuple[int, ...], output_block: int, h: torch.Tensor) -> None:
        """While recording, keep output block ``output_block``'s ResBlock branch output of the pass over
        ``frame_ids``."""
        if self.recording is not None:
            self._keep(frame_ids).resblocks[output_block] = h[:len(frame_ids)]      # (F, C, h, w)
            self._end_call_after(resblock_point(output_block))

    def _keep(self, frame_ids: tuple[int, ...]) -> SourceFeatures:
        return self.pending.setdefault(tuple(frame_ids), SourceFeatures())

    @property
    def last_point(self) -> "ReadPoint | None":
        """The point of a UNet call after which no kept feature is computed."""
        return self.reads.last_point()

    def _end_call_after(self, point: "ReadPoint") -> None:
        """A call made for the features only ends after the last one kept (``host.end_unet_call``)."""
        if self.ends_call and point == self.last_point:
            host.end_unet_call()

    def run_hooks(self, model: Any, frame_ids: Callable[[], tuple[int, ...]]) -> Mapping[torch.nn.Module, Callable]:
        """Forward hooks for the inversion's sampling run: each kept ResBlock's branch output, while recording."""
        def hook_of(output_block: int) -> Callable[[torch.Tensor], None]:
            def hook(h: torch.Tensor) -> None:
                self.keep_resblock(frame_ids(), output_block, h)
            return hook

        return {host.resblock_branch(model, i): hook_of(i) for i in self.reads.resblocks}

    # ------------------------------------------------------------------------------------------ while editing
    def features_at(self, grid_step: int, frame_ids: tuple[int, ...], reads: SourceReads,
                    device: torch.device) -> SourceFeatures:
        """The kept features ``reads`` of grid step ``grid_step`` for the pass over ``frame_ids``, on ``device``
        (what a live source pass over those frames would have kept)."""
        features = self.kept.get((grid_step, tuple(frame_ids)))
        if features is None:
            held = sorted({ids for _, ids in self.kept}, key=lambda ids: ids[0])
            raise ValueError(
                f"inversion: its stored source features were made over frame windows {_windows(held)} but this "
                f"edit's pass holds frames {_windows([tuple(frame_ids)])} at step {grid_step}; sample with the "
                "Frame Windows (and core context windows) the inversion ran with, or set Apply FLATTEN's "
                "source_features to live")
        return SourceFeatures(
            tokens={k: features.tokens[k].to(device, non_blocking=True) for k in reads.tokens},
            resblocks={i: features.resblocks[i].to(device, non_blocking=True) for i in reads.resblocks})

    def check_reader(self, method: "Method", steps: int) -> None:
        """When a node applies ``method`` reading an inversion with stored features: every step's reads are among
        them, in ``sigma-matched`` order (the features are kept at the grid's σ, never at the mirrored ones)."""
        kept = (f"keeps the source features of FLATTEN's PnP blocks for the first {self.steps} of {steps} steps "
                "(Apply FLATTEN's source_features: stored)")
        live = "or set Apply FLATTEN's source_features to live (before DDIM Inversion (TVE))"
        if method.source_order != "sigma-matched":
            raise Refused(f"order: {method.source_order} reads the source at other σ than the sampler's, but the "
                          f"inversion {kept}; use sigma-matched, {live}")
        for step in range(steps):
            reads = method.source_reads(step, steps)
            if not reads:
                continue
            if reads.outputs or not (reads.tokens <= self.reads.tokens and reads.resblocks <= self.reads.resblocks):
                raise Refused(f"inversion: {kept}, and {method.node} reads others; read them with Apply Feature "
                              f"Injection (TVE), block_preset flatten, {live}")
            if step >= self.steps:
                name = "attention_injection_end" if reads.tokens else "conv_injection_end"
                raise Refused(f"{name}: {method.node} injects at step {step + 1} of {steps}, but the inversion "
                              f"{kept}; end it by {self.steps / steps:.2f}, or raise Apply FLATTEN's stored_steps (or set "
                              "its source_features to live) before DDIM Inversion (TVE)")

    # ------------------------------------------------------------------------------------------ what it costs
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in self.kept.values()
                   for t in (*f.tokens.values(), *f.resblocks.values()))

    def describe(self, frames: int, steps: int) -> str:
        """What the inversion holds, for the DDIM Inversion node's text and the server log."""
        total = self.nbytes
        return (f"stored source features for {self.steps} of {steps} steps, {frames} frames: {total / MIB:.1f} MiB "
                f"({total / max(frames, 1) / MIB:.2f} MiB per frame)")

def _windows(frame_id_sets: list[tuple[int, ...]]) -> str:
    return ", ".join(f"{ids[0]}-{ids[-1]}" if list(ids) == list(range(ids[0], ids[-1] + 1)) else str(list(ids))
                     for ids in frame_id_sets)
