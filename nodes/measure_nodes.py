"""Consistency Metrics and Preview Features (TVE): numbers and pictures that explain an edit. Warp error and
flicker: ``flow/consistency.py`` (Lai et al. 2018); feature previews: ``engine/feature_preview.py``."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..engine import host, identity, sockets, validation
from ..engine.feature_preview import FEATURE_BLOCKS, preview_features
from ..engine.inversion import Inversion
from ..engine.edit_metrics import measure_frames
from ..flow.estimate import FlowField
from .schema import Flow, Inversion as InversionSocket, allow_other_weights, schema


class ConsistencyMetrics(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.CONSISTENCY_METRICS, (
            "Temporal consistency of edited frames under the SOURCE video's flow: warp error ×10³ (Lai et al. 2018: "
            "frame t+1 warped into frame t, squared RGB error over non-occluded pixels, mean over pairs) and a "
            "flicker index (mean change of mean intensity). Give the source frames too to see the source's own "
            "floor."), [
            io.Image.Input("images", tooltip="The edited frames."),
            Flow.Input("flow", tooltip="Optical flow of the source video."),
            io.Image.Input("source_images", optional=True, tooltip="The source frames (for the floor)."),
        ], [io.Float.Output(display_name="warp_error_x1000"), io.Float.Output(display_name="flicker"),
            io.String.Output(display_name="summary")], output_node=True)

    @classmethod
    def execute(cls, images: torch.Tensor, flow: FlowField,
                source_images: torch.Tensor | None = None) -> io.NodeOutput:
        sockets.expect(flow, FlowField, "flow", sockets.FLOW)
        validation.flow(flow, "flow")
        edited = measure_frames(images, flow, "images")
        lines = [f"warp error ×10³: {edited.warp_error * 1e3:.3f}", f"flicker: {edited.flicker:.5f}"]
        if source_images is not None:
            source = measure_frames(source_images, flow, "source_images")
            ratio = edited.warp_error / source.warp_error if source.warp_error > 0 else float("inf")
            lines += [f"source warp error ×10³: {source.warp_error * 1e3:.3f} (edit/source {ratio:.2f}×)",
                      f"source flicker: {source.flicker:.5f}"]
        size = flow.crop.describe() if flow.crop is not None else f"{flow.width}x{flow.height}"
        lines.append(f"flow: {flow.method} at {size}, {flow.frames} frames")
        summary = "\n".join(lines)
        return io.NodeOutput(edited.warp_error * 1e3, edited.flicker, summary, ui={"text": [summary]})


class PreviewFeatures(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.PREVIEW_FEATURES, (
            "What TokenFlow sees, shown on the node and returned: the PCA of the source video's self-attention "
            "features per frame (similar colours = similar features) and each frame rebuilt from its nearest "
            "keyframe through the nearest-neighbour field (where it matches the PCA picture, propagation will be "
            "clean)."), [
            io.Model.Input("model", tooltip="The model the inversion was made with."),
            InversionSocket.Input("inversion", tooltip="From DDIM Inversion (TVE) of the source video."),
            io.Float.Input("step_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                           tooltip="Where on the σ grid to look (0 = noisiest)."),
            io.Combo.Input("block", options=FEATURE_BLOCKS, default="output latent",
                           tooltip="Which self-attention block's input features to show."),
            io.Int.Input("keyframe_interval", default=8, min=1, max=1024,
                         tooltip="Every this many frames is a keyframe of the NN-field picture."),
            io.Int.Input("scale", default=8, min=1, max=64, tooltip="Pixels per token in the pictures."),
            allow_other_weights(
                "Off: refuse a model whose weights differ from the model the inversion was made with (another "
                "checkpoint, a LoRA added or removed, other tuning). On: show that model's features of the inverted "
                "source anyway (what an edit with it allowed sees); the node says so."),
        ], [io.Image.Output(display_name="features_pca"), io.Image.Output(display_name="nn_field")],
            output_node=True)

    @classmethod
    def execute(cls, model, inversion: Inversion, step_percent: float, block: str, keyframe_interval: int,
                scale: int, allow_other_weights: bool = False) -> io.NodeOutput:
        sockets.expect(inversion, Inversion, "inversion", sockets.INVERSION)
        pca, field, note = preview_features(model, inversion, step_percent, block, keyframe_interval, scale,
                                            allow_other_weights)
        shown = host.preview_images(pca, "tve_features_pca") + host.preview_images(field, "tve_nn_field")
        ui = {"images": shown}
        if note is not None:
            logging.warning("[TVE] %s", note)
            ui["text"] = [note]
        return io.NodeOutput(pca, field, ui=ui)


NODES = {identity.CONSISTENCY_METRICS: ConsistencyMetrics, identity.PREVIEW_FEATURES: PreviewFeatures}
