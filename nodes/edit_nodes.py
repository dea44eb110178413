"""The nodes that put TVE methods on a MODEL (a patched clone each): Apply Feature Injection, Apply Cross-Frame
Attention, Apply TokenFlow, Apply FLATTEN and Frame Windows (TVE). Each is a shell over one engine call; a node whose
settings replace another node's on the model says so on its output and in the server log."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..engine import identity, sockets
from ..engine.cross_frame import MODES, TOKEN_GRIDS, apply_cross_frame
from ..engine.flatten import GRID_CHOICES, QK_SOURCES, SOURCE_FEATURES, apply_flatten
from ..engine.injection import ORDERS, PRESETS, apply_feature_injection
from ..engine.stack import apply_frame_windows, stack_of
from ..engine.inversion import Inversion
from ..engine.tokenflow import PROPAGATION_MODES, apply_tokenflow
from ..flow.trajectories import Trajectories
from .schema import Inversion as InversionSocket, Trajectories as TrajectoriesSocket, allow_other_weights, fixed_seed
from .schema import schema


def with_notes(model) -> io.NodeOutput:
    """A MODEL node's output: the model and, where its settings replaced another node's on the model or it edits
    with other weights than its inversion's (the stack's notes), each note shown on the node and logged once."""
    notes = list(stack_of(model).notes)
    for note in notes:
        logging.warning("[TVE] %s", note)
    return io.NodeOutput(model, ui={"text": notes} if notes else None)


def fraction(name: str, default: float, tooltip: str) -> io.Float.Input:
    """A fraction of the sampling steps, 0 to 1 in hundredths."""
    return io.Float.Input(name, default=default, min=0.0, max=1.0, step=0.01, tooltip=tooltip)


class ApplyFeatureInjection(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.FEATURE_INJECTION, (
            "Plug-and-Play injection: for the first part of sampling, the edit's decoder self-attention "
            "queries/keys and one ResBlock's features are taken from the source video at the same noise level (a "
            "live source pass each step, or what the inversion stored: Apply FLATTEN's source_features), which "
            "keeps layout and motion. Sample the inverted latent on the inversion's σ grid."), [
            io.Model.Input("model", tooltip="The model you edit with; it must be the one the inversion was made with."),
            InversionSocket.Input("inversion", tooltip="From DDIM Inversion (TVE): the source video at every σ."),
            fraction("attention_injection_end", 0.5, "Fraction of the steps with q/k injection."),
            fraction("conv_injection_end", 0.8, "Fraction of the steps with ResBlock feature injection."),
            io.Combo.Input("block_preset", options=PRESETS, default="tokenflow", tooltip=(
                "Which decoder blocks are injected: TokenFlow's (q/k of all decoder transformers but the first, the "
                "second ResBlock of the second decoder stage) or FLATTEN's.")),
            io.Combo.Input("order", options=ORDERS, default="sigma-matched", tooltip=(
                "sigma-matched: source features at the same σ (the papers). clean-first: step i gets the features "
                "of inversion step i, cleanest first (what other ComfyUI packs do).")),
            allow_other_weights(),
        ], [io.Model.Output()])

    @classmethod
    def execute(cls, model, inversion: Inversion, attention_injection_end: float, conv_injection_end: float,
                block_preset: str, order: str, allow_other_weights: bool = False) -> io.NodeOutput:
        sockets.expect(inversion, Inversion, "inversion", sockets.INVERSION)
        return with_notes(apply_feature_injection(model, inversion, attention_injection_end, conv_injection_end,
                                                  block_preset, order, allow_other_weights))


class ApplyCrossFrameAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.CROSS_FRAME, (
            "Makes every self-attention block attend across frames: 'keyframes' (TokenFlow's extended attention, "
            "one random keyframe per interval, re-drawn each step), 'dense' (FLATTEN: all frames), 'anchor' "
            "(Text2Video-Zero: the anchor frame), 'fine_coarse' (EI²: own frame at full resolution, the others "
            "pooled). A single frame is left unchanged (it is vanilla attention)."), [
            io.Model.Input("model", tooltip="The model to patch (a clone is returned; yours is unchanged)."),
            io.Combo.Input("mode", options=MODES, default="keyframes", tooltip=(
                "keyframes: TokenFlow's extended attention over random keyframes. dense: FLATTEN's, all frames "
                "(memory grows with frames). anchor: Text2Video-Zero's, one anchor frame. fine_coarse: EI²'s, own "
                "frame at full resolution plus the other frames pooled.")),
            io.Int.Input("keyframe_interval", default=8, min=1, max=1024,
                         tooltip="keyframes: one keyframe per this many frames."),
            io.Int.Input("anchor_frame", default=0, min=0, max=100000,
                         tooltip="anchor: the frame every frame attends to (0 = first)."),
            io.Boolean.Input("anchor_include_self", default=False,
                             tooltip="anchor: also attend to the frame's own tokens."),
            io.Int.Input("coarse_factor", default=2, min=1, max=16,
                         tooltip="fine_coarse: pooling of the other frames' tokens."),
            fixed_seed("keyframes: seeds the keyframe draw (re-drawn every step). Fixed: it does not re-roll on every "
                       "queue."),
            io.Combo.Input("token_grids", options=TOKEN_GRIDS, default="all",
                           tooltip="Which UNet resolutions get cross-frame attention."),
            fraction("start_percent", 0.0, "Fraction of the sampling steps after which it starts (0 = first)."),
            fraction("end_percent", 1.0, "Fraction of the sampling steps after which it stops (1 = last)."),
        ], [io.Model.Output()])

    @classmethod
    def execute(cls, model, mode: str, keyframe_interval: int, anchor_frame: int, anchor_include_self: bool,
                coarse_factor: int, seed: int, token_grids: str, start_percent: float,
                end_percent: float) -> io.NodeOutput:
        return with_notes(apply_cross_frame(model, mode, keyframe_interval, anchor_frame, anchor_include_self,
                                            coarse_factor, seed, token_grids, start_percent, end_percent))


class ApplyTokenFlow(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.TOKENFLOW, (
            "TokenFlow: edits random keyframes jointly each step and carries their self-attention outputs to every "
            "frame along nearest-neighbour correspondences of the source video's features, with PnP injection. "
            "Sample the inverted latent on the inversion's σ grid (SamplerCustomAdvanced with DisableNoise and the "
            "inversion's SIGMAS). Apply it after FLATTEN or cross-frame attention; ControlNet and T2I-Adapter hints "
            "follow the keyframes."), [
            io.Model.Input("model", tooltip=(
                "The model you edit with (patch FLATTEN or cross-frame attention first if you stack them).")),
            InversionSocket.Input("inversion",
                                  tooltip="From DDIM Inversion (TVE) of the same frames, with this model."),
            io.Int.Input("keyframe_interval", default=8, min=1, max=1024,
                         tooltip="One keyframe per this many frames (re-drawn every step)."),
            fixed_seed("Seeds the keyframe draw (re-drawn every step). Fixed: it does not re-roll on every queue, so "
                       "the inversion and the edit are not re-run."),
            io.Combo.Input("propagation", options=list(PROPAGATION_MODES), default="paper", tooltip=(
                "paper: blend the two keyframes nearest in time, linear in their distance; fields from a per-frame "
                "source pass. official: the reference code's computation: its rule (current and previous window, "
                "sigmoid weights), and the source branch propagated too, fields and injected features taken from "
                "it.")),
            fraction("attention_injection_end", 0.5, (
                "Fraction of the steps with PnP q/k injection in the keyframe pass (more keeps more of the source "
                "layout).")),
            fraction("conv_injection_end", 0.8,
                     "Fraction of the steps with PnP ResBlock feature injection in the keyframe pass."),
            allow_other_weights(),
        ], [io.Model.Output()])

    @classmethod
    def execute(cls, model, inversion: Inversion, keyframe_interval: int, seed: int, propagation: str,
                attention_injection_end: float, conv_injection_end: float,
                allow_other_weights: bool = False) -> io.NodeOutput:
        sockets.expect(inversion, Inversion, "inversion", sockets.INVERSION)
        return with_notes(apply_tokenflow(model, inversion, keyframe_interval, seed, propagation,
                                          attention_injection_end, conv_injection_end, allow_other_weights))


class ApplyFLATTEN(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.FLATTEN, (
            "FLATTEN: dense spatio-temporal self-attention in every block plus attention along the source video's "
            "optical-flow trajectories at the chosen token grids. Use the same MODEL for TVE_DDIMInversion and for "
            "sampling; stack TokenFlow after it if you like."), [
            io.Model.Input("model", tooltip=(
                "The model to patch (a clone). Give the result to DDIM Inversion too: FLATTEN inverts with the same "
                "attention.")),
            TrajectoriesSocket.Input("trajectories", tooltip=(
                "From Flow Trajectories (TVE), built on the latent you invert and sample.")),
            io.Combo.Input("token_grids", options=GRID_CHOICES, default="highest resolution", tooltip=(
                "Where trajectory attention runs: the highest-resolution self-attention (the paper) or every one.")),
            io.Combo.Input("qk_source", options=QK_SOURCES, default="dense_output", tooltip=(
                "dense_output: the dense-attention output is the trajectory attention's q, k and v (the paper). "
                "projections: the block's own q/k with the dense output as v.")),
            io.Boolean.Input("frame_pooled_norm", default=True, tooltip=(
                "On: the ResBlock GroupNorms and the output norm take their statistics over all frames a pass holds "
                "(per CFG chunk; a frame window's frames with Frame Windows), as FLATTEN's official inflated UNet "
                "does, in the inversion too. Off: each frame is normalised alone (plain SD).")),
            io.Combo.Input("source_features", options=SOURCE_FEATURES, default="live", optional=True, tooltip=(
                "Where PnP injection (Apply Feature Injection, block_preset flatten) gets the source's features. "
                "live (default): a source pass each step computes them; nothing is held. stored: DDIM Inversion keeps "
                "them and every edit of that inversion replays them, as the official code does: the same numbers, "
                "edits about 25 % faster (the inversion 1.4-1.6x slower with formula next_sigma), but RAM: about "
                "10 MiB per frame and stored step at 512x512 with SD1.5 in fp16, 400 MiB per frame for 40 of 50 "
                "steps (6 GiB for 16 frames). For short clips edited with many prompts. Apply FLATTEN before DDIM "
                "Inversion; the DDIM Inversion node shows what it holds.")),
            io.Float.Input("stored_steps", default=0.8, min=0.0, max=1.0, step=0.01, optional=True, tooltip=(
                "stored: the fraction of the steps, from the first, whose source features the inversion keeps "
                "(the official injects 40 of 50: 0.8); the injection must end by then.")),
        ], [io.Model.Output()])

    @classmethod
    def execute(cls, model, trajectories: Trajectories, token_grids: str, qk_source: str,
                frame_pooled_norm: bool = True, source_features: str = "live",
                stored_steps: float = 0.8) -> io.NodeOutput:
        sockets.expect(trajectories, Trajectories, "trajectories", sockets.TRAJECTORIES)
        return with_notes(apply_flatten(model, trajectories, token_grids, qk_source, frame_pooled_norm,
                                        source_features, stored_steps))


class ApplyFrameWindows(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.FRAME_WINDOWS, (
            "Sets how many frames the TVE passes of this model hold at a time, so a video of any length edits in "
            "bounded memory. Attention across frames (FLATTEN, cross-frame) runs in overlapping windows that are "
            "blended; per-frame work runs in batches (same result); TokenFlow edits its keyframes in groups. Put it "
            "anywhere on the model chain, before DDIM Inversion (TVE) to window the inversion too. Without it the "
            "passes hold 16 frames."), [
            io.Model.Input("model", tooltip="The model whose TVE passes are windowed (a clone is returned)."),
            io.Int.Input("frames_per_window", default=16, min=0, max=4096, tooltip=(
                "Frames one pass holds. 16 fits 8-12 GB at 512 px with SD1.5 (about 1024 px with SDXL: 8); lower it "
                "if you run out of memory, raise it for more frames attending to each other. 0: all frames at once "
                "(memory grows with the video).")),
            io.Int.Input("overlap", default=4, min=0, max=4095, tooltip=(
                "Frames two neighbouring windows share, blended so no seam shows (attention across frames only; "
                "below frames_per_window).")),
        ], [io.Model.Output()])

    @classmethod
    def execute(cls, model, frames_per_window: int, overlap: int) -> io.NodeOutput:
        return with_notes(apply_frame_windows(model, frames_per_window, overlap))


NODES = {identity.FEATURE_INJECTION: ApplyFeatureInjection, identity.CROSS_FRAME: ApplyCrossFrameAttention,
         identity.TOKENFLOW: ApplyTokenFlow, identity.FLATTEN: ApplyFLATTEN, identity.FRAME_WINDOWS: ApplyFrameWindows}
