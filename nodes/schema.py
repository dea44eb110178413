"""What TVE's node classes share on ComfyUI's V3 node schema (``comfy_api.latest.io``): the category, a node's
schema from the one identity table (``engine/identity.py``), TVE's socket types, and the inputs several nodes
declare alike."""
from __future__ import annotations

from comfy_api.latest import io

from ..engine import identity, sockets

CATEGORY = "video editing/TVE"

Flow = io.Custom(sockets.FLOW)
Trajectories = io.Custom(sockets.TRAJECTORIES)
Inversion = io.Custom(sockets.INVERSION)
TemporalAdapter = io.Custom(sockets.TEMPORAL_ADAPTER)
CoreOpticalFlow = io.Custom("OPTICAL_FLOW")            # core's Load Optical Flow Model (ComfyUI 0.33+)

EDIT_WITH_OTHER_WEIGHTS = (
    "Off: refuse a model whose weights differ from the model the inversion was made with (another checkpoint, a LoRA "
    "added or removed, other tuning). On: edit with them anyway (e.g. a style LoRA for the edit only); the node says "
    "so. TVE's own patches never count.")


def schema(node: identity.Node, description: str, inputs: list, outputs: list,
           output_node: bool = False) -> io.Schema:
    """The schema of ``node`` (its id and display name) in TVE's category."""
    return io.Schema(node_id=node.id, display_name=node.display, category=CATEGORY, description=description,
                     inputs=inputs, outputs=outputs, is_output_node=output_node)


def fixed_seed(tooltip: str) -> io.Int.Input:
    """A ``seed`` widget without a re-roll control: a tie-break or keyframe draw that should not change (and re-run
    the graph) on every queue."""
    return io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=False,
                        tooltip=tooltip)


def allow_other_weights(tooltip: str = EDIT_WITH_OTHER_WEIGHTS) -> io.Boolean.Input:
    """The optional switch that lets a node use a model whose weights differ from its inversion's."""
    return io.Boolean.Input("allow_other_weights", default=False, optional=True, tooltip=tooltip)
