"""Every TVE node's id and display name, in one table.

The node classes declare themselves with these, refusals and notes name nodes by them, and a method on a MODEL
remembers the node that applied it. The id is what a workflow stores (``NODE_CLASS_MAPPINGS`` key, never changed once
shipped); the display name is what the graph editor shows.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Node:
    """One TVE node: its workflow id and its display name."""
    id: str
    display: str

    def __str__(self) -> str:
        return self.display


OPTICAL_FLOW = Node("TVE_OpticalFlow", "Optical Flow (TVE)")
FLOW_TRAJECTORIES = Node("TVE_FlowTrajectories", "Flow Trajectories (TVE)")
PREVIEW_FLOW = Node("TVE_PreviewFlow", "Preview Flow (TVE)")
PREVIEW_TRAJECTORIES = Node("TVE_PreviewTrajectories", "Preview Trajectories (TVE)")
DDIM_INVERSION = Node("TVE_DDIMInversion", "DDIM Inversion (TVE)")
FEATURE_INJECTION = Node("TVE_ApplyFeatureInjection", "Apply Feature Injection (TVE)")
CROSS_FRAME = Node("TVE_ApplyCrossFrameAttention", "Apply Cross-Frame Attention (TVE)")
TOKENFLOW = Node("TVE_ApplyTokenFlow", "Apply TokenFlow (TVE)")
FLATTEN = Node("TVE_ApplyFLATTEN", "Apply FLATTEN (TVE)")
FRAME_WINDOWS = Node("TVE_FrameWindows", "Frame Windows (TVE)")
MOTION_DYNAMICS = Node("TVE_MotionDynamicsLatents", "Motion Dynamics Latents (TVE)")
CONSISTENCY_METRICS = Node("TVE_ConsistencyMetrics", "Consistency Metrics (TVE)")
PREVIEW_FEATURES = Node("TVE_PreviewFeatures", "Preview Features (TVE)")
ONE_SHOT_TUNE = Node("TVE_OneShotTune", "One-Shot Tune (TVE)")
SAVE_TEMPORAL_ADAPTER = Node("TVE_SaveTemporalAdapter", "Save Temporal Adapter (TVE)")
LOAD_TEMPORAL_ADAPTER = Node("TVE_LoadTemporalAdapter", "Load Temporal Adapter (TVE)")

ALL = (OPTICAL_FLOW, FLOW_TRAJECTORIES, PREVIEW_FLOW, PREVIEW_TRAJECTORIES, DDIM_INVERSION, FEATURE_INJECTION,
       CROSS_FRAME, TOKENFLOW, FLATTEN, FRAME_WINDOWS, MOTION_DYNAMICS, CONSISTENCY_METRICS, PREVIEW_FEATURES,
       ONE_SHOT_TUNE, SAVE_TEMPORAL_ADAPTER, LOAD_TEMPORAL_ADAPTER)
