"""The per-run state of a TVE model: made fresh for every sampling call, so clones sampled in one prompt (or core's
per-device clones) never share it.

Three frame-index spaces, told apart by name throughout the engine:
- a **frame id** is a frame's global index in the video (0 .. F−1);
- a **position** is an index into the frames of the current CALC_COND_BATCH call (``SamplingRun.frame_ids``: a core
  context window's frames, or the whole video); a pass over some of them holds ``positions`` (a long tensor;
  None: all of them);
- a **slot** is an index into one step's keyframes (TokenFlow).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Mapping

import torch

from . import host
from .methods import ReadPoint, resblock_point, tokens_point

if TYPE_CHECKING:
    from .stack import MethodStack


class Pass(Enum):
    INVERSION = "inversion"      # TVE_DDIMInversion walking up the σ grid
    SOURCE = "source"            # the inverted source at this step's σ, source conditioning
    KEYFRAMES = "keyframes"      # TokenFlow: the keyframes of this step, edit conditioning
    EDIT = "edit"                # the sampler's own call


@dataclass
class SourceFeatures:
    """What one source pass left for the later passes over the same frames (activations, not settings)."""
    tokens: dict = field(default_factory=dict)        # BlockKey -> (n, T, C) normed self-attention input
    resblocks: dict = field(default_factory=dict)     # output block id -> (n, C, h, w) ResBlock branch output
    positions: torch.Tensor | None = None             # (n,) the call positions it held (None: all of them)


@dataclass
class SamplingRun:
    """One sampling call of a TVE model: which pass runs now, over which frames, at which step, and what the step's
    source pass left. The one mutable object the routers and hooks read (``transformer_options[RUN_KEY]``)."""
    stack: "MethodStack"
    sigma_floor: float = 0.0
    step: int = -1                                # interval of the inversion grid holding this step's σ
    steps: int = 0
    frame_ids: tuple[int, ...] = ()               # frame ids of the current call, in call order
    sample_step: int = -1                         # index of this step's σ in the sampler's schedule
    schedule_percent: float = 0.0                 # fraction of the sampler's schedule reached (0 at the first step)
    pass_: Pass | None = None
    pass_positions: torch.Tensor | None = None    # call positions of the pass now running (None: all)
    pass_frame_ids: tuple[int, ...] | None = None  # their frame ids
    source: SourceFeatures = field(default_factory=SourceFeatures)
    pass_source_rows: Any = None                  # rows of ``source`` holding the pass's frames, on the device, set
    #                                               once per pass (None: the same rows; an error: not all held)
    source_end: ReadPoint | None = None           # the source pass now running ends after this point (None: runs all)
    controls: dict = field(default_factory=dict)  # ControlNet copies per (control, frame ids), host.control_for_frames
    method_state: dict = field(default_factory=dict)   # id(method) -> what a method keeps for a step or a pass
    alike_chunks: tuple[int, ...] | None = None   # per CFG chunk of the UNet call now running, the first chunk equal
    #                                               to it up to the first cross-attention (None: not known)

    def frames_per_chunk(self) -> int:
        """Frames each CFG chunk of the current UNet call holds: those of the pass now running, else the call's."""
        return len(self.pass_frame_ids if self.pass_frame_ids is not None else self.frame_ids)

    def keep_source_tokens(self, key: tuple[str, int, int], n: torch.Tensor) -> None:
        """The source pass keeps block ``key``'s self-attention input (F, T, C); ends its UNet call if that was the
        last feature read this step."""
        self.source.tokens[key] = n
        if self.source_end == tokens_point(key):
            host.end_unet_call()

    def keep_source_resblock(self, output_block: int, h: torch.Tensor) -> None:
        """The source pass keeps output block ``output_block``'s ResBlock branch (F, C, h, w); ends its UNet call if
        that was the last feature read this step."""
        self.source.resblocks[output_block] = h
        if self.source_end == resblock_point(output_block):
            host.end_unet_call()

    def positions_of(self, frame_ids: tuple[int, ...]) -> torch.Tensor:
        """Call positions of ``frame_ids``."""
        where = {f: p for p, f in enumerate(self.frame_ids)}
        return torch.tensor([where[f] for f in frame_ids], dtype=torch.long)

    def frame_ids_at(self, positions: torch.Tensor | None) -> tuple[int, ...]:
        """Frame ids of call ``positions`` (None: all of them)."""
        return self.frame_ids if positions is None else tuple(self.frame_ids[i] for i in positions.tolist())

    def source_rows(self, positions: torch.Tensor | None) -> torch.Tensor | None:
        """Rows of the source pass's features holding call ``positions`` (None: all of them); None where the rows
        are those positions already (the source pass held exactly them)."""
        held = self.source.positions
        if _same(held, positions):
            return None
        frames = len(self.frame_ids)
        held = torch.arange(frames) if held is None else held
        positions = torch.arange(frames) if positions is None else positions
        row = torch.full((frames,), -1, dtype=torch.long)
        row[held] = torch.arange(len(held))
        rows = row[positions]
        if bool((rows < 0).any()):
            missing = [self.frame_ids[i] for i in positions[rows < 0].tolist()]
            raise RuntimeError(f"TVE: the source pass of this step did not hold frames {missing}")
        return rows

    def find_source_rows(self, positions: torch.Tensor | None, device: torch.device) -> None:
        """Before a pass over call ``positions`` (once per pass, not per block): where its frames' source
        features are, on ``device``, so ``source_at_pass`` reads no value on the host."""
        try:
            rows = self.source_rows(positions)
        except RuntimeError as error:        # raised where a block reads the source of frames it did not hold
            self.pass_source_rows = error
            return
        self.pass_source_rows = None if rows is None else rows.to(device)

    def source_at_pass(self, features: torch.Tensor) -> torch.Tensor:
        """The source pass's ``features`` (a row per frame it held) at the frames of the pass now running."""
        rows = self.pass_source_rows
        if isinstance(rows, RuntimeError):
            raise rows
        return features if rows is None else features[rows]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two position sets are the same (None: all frames), compared on the CPU where they live."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool((a == b).all())


@dataclass(frozen=True)
class CallLayout:
    """How one UNet call's batch is laid out: ``chunks`` conds, each holding the same ``frame_ids``."""
    chunks: int
    frame_ids: tuple[int, ...]       # frame id of each position of a chunk
    grid_hw: tuple[int, int]         # token grid of the current block
    step: int                        # index of the current σ in the sampler's schedule (-1 if unknown)


def call_layout(batch: int, extra_options: Mapping[str, Any]) -> CallLayout:
    """Chunks, frame ids, token grid and step of an attention patch's call (``batch`` rows): no device read."""
    chunks = host.cond_chunks(extra_options)
    if batch % chunks:
        raise ValueError(f"attention batch {batch} is not a multiple of {chunks} cond chunks")
    frames = batch // chunks
    frame_ids = call_frame_ids(frames, extra_options)
    if len(frame_ids) != frames:
        raise ValueError(f"the call lists {len(frame_ids)} frames but holds {frames} per chunk")
    run = current_run(extra_options)
    return CallLayout(chunks=chunks, frame_ids=frame_ids, grid_hw=host.token_grid(extra_options),
                      step=-1 if run is None else run.sample_step)


def call_frame_ids(frames: int, transformer_options: Mapping[str, Any]) -> tuple[int, ...]:
    """Frame ids of a call's ``frames`` frames: those of the TVE pass now running, else those the core context
    window's call holds (its causal frame included), else 0..frames-1."""
    run = current_run(transformer_options)
    if run is not None and run.pass_frame_ids is not None:
        return run.pass_frame_ids
    window = host.context_window(transformer_options)
    if window is not None:
        return host.context_window_frame_ids(window)
    return tuple(range(frames))


def current_run(transformer_options: Mapping[str, Any]) -> SamplingRun | None:
    run = transformer_options.get(host.RUN_KEY)
    return run if isinstance(run, SamplingRun) else None


def current_pass(transformer_options: Mapping[str, Any]) -> Pass | None:
    run = current_run(transformer_options)
    return None if run is None else run.pass_
