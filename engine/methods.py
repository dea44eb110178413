"""The one interface between the engine and a TVE method on a MODEL (FLATTEN, cross-frame attention, PnP injection,
TokenFlow): what a method may provide, each with a default that does nothing, so a method states only what it does
and the engine asks, never probes.

A method is an immutable settings object applied by one node (``node``). It may:
- compute self-attention on some blocks (``attention_blocks``, ``attend``); ``inner`` is the attention below it on
  that block (a method applied earlier, another pack's replace, or the host's backend), which it may run or
  replace (``runs_inner_attention``: a method that replaces it refuses to hide another pack's replace);
- mix frames in that attention (``attends_across_frames``): frame windows then overlap and blend, and a window must
  hold at least two frames;
- name the frames every frame window must hold besides its own (``shared_frames``);
- read features of the step's source pass, in its ``source_order`` (``source_reads``: blocks whose self-attention input, output blocks whose
  ResBlock branch, the engine keeps from the source pass) and use them (``attention_input``, ``run_hooks``);
- have the inversion made with it keep source features for its edits to replay instead of a live source pass
  (``stored_source``: FLATTEN's stored-feature mode);
- pool the statistics of some GroupNorms over the frames of each chunk in all its passes, the inversion's
  included (``frame_pooled_norms``: FLATTEN's inflated UNet);
- prepare what its attention needs on the device once per pass, outside the UNet (``prepare_pass``), and compute
  CFG chunks that are still alike at the first self-attention block once (``computes_alike_chunks_once``): no
  device->host synchronisation per block;
- run a whole step itself (``drives_step``, ``drive_step``): TokenFlow's keyframe and propagation passes;
- check the sampled latent before the first step (``check_latent``);
- name the sources it was built from (``sources``: an INVERSION, TRAJECTORIES) and the inversion it reads, and
  whether the artist allows editing with other weights than that inversion was made with
  (``allow_other_weights``: refused otherwise, when the node runs and when sampling starts);
- refuse to be added after the methods already on a model (``check_added_after``), refuse a later method
  (``check_follower``), and replace an earlier method (``replaces``: its settings then win).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from .identity import Node

if TYPE_CHECKING:
    from .passes import Step
    from .run import SamplingRun
    from .stack import MethodStack
    from .stored_source import StoredSource

BlockKey = tuple[str, int, int]                  # a transformer block's attn1 replace key (name, id, index)
ReadPoint = tuple[int, int, int]                 # where a UNet call computes a feature (tokens_point, resblock_point)
Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]   # (q, k, v, extra) -> out


@dataclass(frozen=True)
class SourceReads:
    """What methods read from one step's source pass: the self-attention input ``n`` of ``tokens`` blocks, the
    ResBlock branch output of ``resblocks`` output blocks, and what the self-attention of ``outputs`` blocks returns
    (TokenFlow ``official``: the keyframes' source outputs it propagates, and the fields its propagated source
    branch computes in that slot)."""
    tokens: frozenset = frozenset()               # BlockKey
    resblocks: frozenset = frozenset()            # output block ids
    outputs: frozenset = frozenset()              # BlockKey

    def __or__(self, other: "SourceReads") -> "SourceReads":
        return SourceReads(self.tokens | other.tokens, self.resblocks | other.resblocks, self.outputs | other.outputs)

    def __bool__(self) -> bool:
        return bool(self.tokens or self.resblocks or self.outputs)

    def last_point(self) -> ReadPoint | None:
        """The point of a UNet call after which nothing read is computed: a source pass may end there, since every
        later layer feeds only features nobody reads. None: no such point, the whole call runs (nothing is read,
        or a self-attention's output is: no call is ended after an attention, which is the last block's at most)."""
        if self.outputs:
            return None
        points = [tokens_point(key) for key in self.tokens] + [resblock_point(i) for i in self.resblocks]
        return max(points, default=None)


_PARTS = {"input": 0, "middle": 1, "output": 2}       # the UNet's order: input blocks, middle block, output blocks


def tokens_point(key: BlockKey) -> ReadPoint:
    """Where block ``key``'s self-attention input is computed: in its UNet block, after the block's ResBlock, in
    transformer order."""
    return _PARTS[key[0]], key[1], key[2]


def resblock_point(output_block: int) -> ReadPoint:
    """Where output block ``output_block``'s ResBlock branch is computed: first in that block."""
    return _PARTS["output"], output_block, -1


class Refused(ValueError):
    """A method that does not compose with one already on the model; says which order works."""


class Method:
    """Base of every TVE method: the engine's whole view of one. A subclass (a frozen dataclass) overrides what it
    provides; a plain attribute below may be one of its fields."""
    node: Node                                    # the node that applied it (refusals and notes name it)
    what: str = "settings"                        # what a later node of the kind replaces, for notes
    attention_blocks: frozenset = frozenset()     # BlockKey of the blocks whose self-attention it computes
    attends_across_frames: bool = False
    attends_to_a_fixed_frame: bool = False        # its attention reads one frame every call must hold (an anchor)
    runs_inner_attention: bool = False
    drives_step: bool = False
    inversion: Any = None                         # the INVERSION whose source pass it reads (one per model)
    allow_other_weights: bool = False             # edit with other weights than the inversion's, on purpose
    source_order: str = "sigma-matched"           # which stored source latent a step reads (Inversion.source_at)
    computes_alike_chunks_once: bool = False      # reads SamplingRun.alike_chunks (the engine then computes it)

    # ------------------------------------------------------------------------------------------ attention
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict, run: "SamplingRun",
               inner: Attention) -> torch.Tensor:
        """Self-attention on one of ``attention_blocks``: q, k, v (chunks·F, T, C) -> (chunks·F, T, C)."""
        return inner(q, k, v, extra_options)

    def prepare_pass(self, run: "SamplingRun", device: torch.device) -> None:
        """Before a pass's UNet calls (``run.pass_`` and its frames set): put what ``attend`` needs on ``device`` into
        ``run.method_state``, so that no block copies or reads it."""

    def shared_frames(self, own: Sequence[int], frame_ids: Sequence[int], step: int) -> list[int]:
        """Call positions a frame window holding the call's positions ``own`` must hold besides them."""
        return []

    # ------------------------------------------------------------------------------------------ the source
    def sources(self) -> list:
        """The INVERSION / TRAJECTORIES it was built from (checked to come from one latent)."""
        return []

    def source_reads(self, step: int, steps: int) -> SourceReads:
        """What it reads from the source pass at grid step ``step`` of ``steps``."""
        return SourceReads()

    def attention_input(self, key: BlockKey, n: torch.Tensor, run: "SamplingRun") -> torch.Tensor | None:
        """Tokens (chunks·F, T, C) to take q and k from instead of ``n`` in this pass (PnP), or None."""
        return None

    def run_hooks(self, model: Any, run: "SamplingRun") -> Mapping[torch.nn.Module, Callable]:
        """Forward hooks for one sampling run: module -> ``fn(output) -> output or None`` (a replacement)."""
        return {}

    def stored_source(self, model: Any, steps: int) -> "StoredSource | None":
        """What a DDIM inversion of ``steps`` sampling steps made with ``model`` (which carries this method) keeps
        of the source for the edits to replay, or None (they run a live source pass)."""
        return None

    def frame_pooled_norms(self, model: Any) -> Sequence[torch.nn.Module]:
        """GroupNorms of ``model`` whose statistics pool the frames of each CFG chunk of every call of a sampling run
        (inversion included), as on the (chunks, C, F, h, w) video tensor; frames per chunk: the pass's."""
        return ()

    # ------------------------------------------------------------------------------------------ the step
    def drive_step(self, step: "Step") -> list:
        """Run the whole step (only where ``drives_step``): -> one (F, C, h, w) per cond, like the executor."""
        raise NotImplementedError

    def check_latent(self, latent_image: torch.Tensor) -> None:
        """Before the first step: refuse a sampled latent this method cannot use."""

    # ------------------------------------------------------------------------------------------ composition
    def check_added_after(self, stack: "MethodStack") -> None:
        """Raise Refused if this method cannot follow the methods of ``stack`` (naming both nodes and the order
        that works)."""

    def check_follower(self, later: "Method") -> None:
        """Raise Refused if ``later`` may not be applied after this method."""

    def replaces(self, earlier: "Method") -> bool:
        """Whether this method takes the place of ``earlier`` (the later settings win)."""
        return type(earlier) is type(self)

    def ties_to_a_video(self) -> bool:
        """Whether it reads a source video (inversion, trajectories): then it cannot sample new frames from noise."""
        return bool(self.sources())
