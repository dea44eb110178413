"""Bad input through a real headless ComfyUI: API prompts derived from the shipped workflows, each broken in one
way, must end in an error that names the input of a TVE node (raised by the pack, not a torch or OpenCV traceback)
or in ComfyUI's validation error naming it — never in a "success" with wrong output.

Classes of bad input (issue 16): non-finite values (frames, latents, float widgets), mismatched sources (another
video's latent, the clean latent, trajectories of another latent, a model whose sampling was patched, new noise),
tiny or empty inputs (one frame where two are needed, frames or latents smaller than one cell), latents and models
of other families, unreadable files. ``APPLICABLE`` says which classes each node can meet through its inputs;
``test_every_node_has_a_probe_of_every_class_that_applies`` keeps the probe table complete.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import pytest

from tve.tests.e2e.session_files import FRAMES, HEIGHT, PACK_FOLDER, RAFT_PLACEHOLDER, SMALL, WIDTH
from tve.tests.e2e.test_workflows import WORKFLOW_DIR, load, with_overrides
from tve.tests.e2e.ui_workflow import to_api

pytestmark = pytest.mark.real_host

NON_FINITE, MISMATCH, TINY, FAMILY, FILE = "non-finite", "mismatched source", "tiny or empty", "other family", "file"

# The classes each node's inputs can carry. PreviewFlow / FLATTEN take no frames, latents or floats: a FLOW or
# TRAJECTORIES only comes from a TVE node that refused non-finite input already (unit tests cover the values).
APPLICABLE = {
    "TVE_OpticalFlow": {NON_FINITE, TINY, FILE},
    "TVE_FlowTrajectories": {NON_FINITE, MISMATCH, TINY, FAMILY},
    "TVE_PreviewFlow": {MISMATCH},
    "TVE_PreviewTrajectories": {NON_FINITE, MISMATCH, TINY},
    "TVE_DDIMInversion": {NON_FINITE, MISMATCH, TINY, FAMILY},
    "TVE_ApplyFeatureInjection": {NON_FINITE, MISMATCH},
    "TVE_ApplyCrossFrameAttention": {NON_FINITE, MISMATCH, TINY},
    "TVE_ApplyTokenFlow": {NON_FINITE, MISMATCH},
    "TVE_ApplyFLATTEN": {MISMATCH},
    "TVE_MotionDynamicsLatents": {NON_FINITE, TINY, FAMILY},
    "TVE_ConsistencyMetrics": {NON_FINITE, MISMATCH, TINY},
    "TVE_PreviewFeatures": {NON_FINITE, MISMATCH, TINY},
    "TVE_OneShotTune": {NON_FINITE, TINY, FAMILY},
    "TVE_SaveTemporalAdapter": {FILE},
    "TVE_LoadTemporalAdapter": {FILE},
    "TVE_FrameWindows": set(),          # a model and two bounded integers (overlap >= window: test_frame_windows)
}


class Graph:
    """An API prompt being broken: nodes found by class, inputs set, core nodes spliced in."""

    def __init__(self, nodes: dict):
        self.nodes = nodes

    def id(self, class_type: str) -> str:
        ids = [i for i, n in self.nodes.items() if n["class_type"] == class_type]
        assert len(ids) == 1, f"{class_type}: {len(ids)} nodes"
        return ids[0]

    def inputs(self, class_type: str) -> dict:
        return self.nodes[self.id(class_type)]["inputs"]

    def set(self, class_type: str, **values) -> "Graph":
        for name, value in values.items():
            assert name in self.inputs(class_type), f"{class_type} has no input {name}"
            self.inputs(class_type)[name] = value
        return self

    def add(self, class_type: str, **inputs) -> list:
        node_id = f"probe{len(self.nodes)}"
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": class_type}}
        return [node_id, 0]

    def out(self, class_type: str, index: int = 0) -> list:
        return [self.id(class_type), index]


def nan_images(g: Graph, images: list) -> list:
    """``images`` with an 8x8 NaN patch in every frame (ImageBlend with a NaN factor, composited at (8, 8))."""
    patch = g.add("ImageCrop", image=images, width=8, height=8, x=0, y=0)
    nan = g.add("ImageBlend", image1=patch, image2=patch, blend_factor=math.nan, blend_mode="normal")
    return g.add("ImageCompositeMasked", destination=images, source=nan, x=8, y=8, resize_source=False)


def nan_latent(g: Graph, latent: list) -> list:
    return g.add("LatentMultiply", samples=latent, multiplier=math.nan)


def zero_height_latent(g: Graph, latent: list) -> list:
    return g.add("TrimVideoLatent", samples=latent, trim_amount=HEIGHT)     # a 4-D latent loses its rows


def sd3_latent(g: Graph, frames: int = FRAMES) -> list:
    return g.add("EmptySD3LatentImage", width=WIDTH, height=HEIGHT, batch_size=frames)


def frames(g: Graph) -> list:
    """The source frames every node of a shipped workflow works on (the range, resized)."""
    return g.out("ImageScaleToMaxDimension")


@dataclass(frozen=True)
class Probe:
    name: str
    node: str                       # the TVE node whose input is bad
    kind: str                       # class of bad input
    workflow: str
    mutate: Callable[[Graph], None]
    input: str                      # the input the error must name (its message starts with "<input>:")
    raised_by: str | None = None    # the node that raises, when not ``node`` (a check before the first step)
    validation: bool = False        # refused by ComfyUI's prompt validation rather than at execution
    combo: bool = False             # the bad value is a combo's: see ``refused_by_validation``


def _wire(class_type: str, name: str, source: Callable[[Graph], list]) -> Callable[[Graph], None]:
    return lambda g: g.set(class_type, **{name: source(g)})


def _with_preview_features(g: Graph, **values) -> None:
    node = g.add("TVE_PreviewFeatures", model=g.out("CheckpointLoaderSimple"), inversion=g.out("TVE_DDIMInversion", 1),
                 step_percent=0.5, block="output latent", keyframe_interval=2, scale=2)
    g.nodes[node[0]]["inputs"].update(values)
    g.add("PreviewImage", images=node)


def _v_prediction(g: Graph, model: list) -> list:
    return g.add("ModelSamplingDiscrete", model=model, sampling="v_prediction", zsnr=False)


def _other_video_inversion(g: Graph) -> list:
    """The inverted latent of another video of the same size: the frames upside down, encoded and inverted."""
    flipped = g.add("ImageFlip", image=frames(g), flip_method="x-axis: vertically")
    latent = g.add("VAEEncode", pixels=flipped, vae=g.out("CheckpointLoaderSimple", 2))
    inputs = {**g.inputs("TVE_DDIMInversion"), "latent": latent}
    return g.add("TVE_DDIMInversion", **inputs)


T, F, PNP, CF, TF, TFF, FL, T2V = ("optical_flow_preview.json", "flatten_edit.json", "pnp_per_frame_edit.json",
                                   "anchor_attention_edit.json", "tokenflow_edit.json", "tokenflow_flatten_edit.json",
                                   "flatten_edit.json", "text2video_zero.json")
EI2 = "ei2_one_shot_edit.json"

PROBES = [
    # ------------------------------------------------------------------ Optical Flow
    Probe("flow_nan_patch", "TVE_OpticalFlow", NON_FINITE, T,
          _wire("TVE_OpticalFlow", "images", lambda g: nan_images(g, frames(g))), "images"),
    Probe("flow_dis_frames_below_its_patch", "TVE_OpticalFlow", TINY, T,
          _wire("TVE_OpticalFlow", "images", lambda g: g.add("ImageCrop", image=frames(g), width=10, height=10, x=0,
                                                             y=0)), "images"),
    Probe("flow_raft_frames_below_one_cell", "TVE_OpticalFlow", TINY, T,
          lambda g: g.set("TVE_OpticalFlow", method="raft_large", raft_weights=RAFT_PLACEHOLDER,
                          images=g.add("ImageCrop", image=frames(g), width=64, height=4, x=0, y=0)), "images"),
    Probe("flow_one_frame", "TVE_OpticalFlow", TINY, T,
          _wire("TVE_OpticalFlow", "images", lambda g: g.add("ImageFromBatch", image=frames(g), batch_index=0,
                                                             length=1)), "images"),
    Probe("flow_empty_raft_file", "TVE_OpticalFlow", FILE, T,
          lambda g: g.set("TVE_OpticalFlow", method="raft_large", raft_weights=RAFT_PLACEHOLDER), "raft_weights"),
    # ------------------------------------------------------------------ Flow Trajectories
    Probe("trajectories_nan_latent", "TVE_FlowTrajectories", NON_FINITE, T,
          _wire("TVE_FlowTrajectories", "latent", lambda g: nan_latent(g, g.out("VAEEncode"))), "latent"),
    Probe("trajectories_latent_of_fewer_frames", "TVE_FlowTrajectories", MISMATCH, T,
          _wire("TVE_FlowTrajectories", "latent", lambda g: g.add("LatentFromBatch", samples=g.out("VAEEncode"),
                                                                  batch_index=0, length=FRAMES - 2)), "latent"),
    Probe("trajectories_zero_height_latent", "TVE_FlowTrajectories", TINY, T,
          _wire("TVE_FlowTrajectories", "latent", lambda g: zero_height_latent(g, g.out("VAEEncode"))), "latent"),
    Probe("trajectories_sd3_latent", "TVE_FlowTrajectories", FAMILY, T,
          _wire("TVE_FlowTrajectories", "latent", sd3_latent), "latent"),
    # ------------------------------------------------------------------ Preview Flow / Trajectories
    Probe("preview_flow_gets_a_latent", "TVE_PreviewFlow", MISMATCH, T,
          _wire("TVE_PreviewFlow", "flow", lambda g: g.out("VAEEncode")), "flow", validation=True),
    Probe("preview_tracks_nan_frames", "TVE_PreviewTrajectories", NON_FINITE, T,
          _wire("TVE_PreviewTrajectories", "images", lambda g: nan_images(g, frames(g))), "images"),
    Probe("preview_tracks_other_frame_count", "TVE_PreviewTrajectories", MISMATCH, T,
          _wire("TVE_PreviewTrajectories", "images", lambda g: g.add("ImageFromBatch", image=frames(g), batch_index=0,
                                                                     length=FRAMES - 1)), "images"),
    Probe("preview_tracks_tiny_frames", "TVE_PreviewTrajectories", TINY, T,
          _wire("TVE_PreviewTrajectories", "images", lambda g: g.add("ImageCrop", image=frames(g), width=4, height=4,
                                                                     x=0, y=0)), "images"),
    # ------------------------------------------------------------------ DDIM Inversion
    Probe("inversion_nan_latent", "TVE_DDIMInversion", NON_FINITE, PNP,
          _wire("TVE_DDIMInversion", "latent", lambda g: nan_latent(g, g.out("VAEEncode"))), "latent"),
    Probe("inversion_nan_frames", "TVE_DDIMInversion", NON_FINITE, PNP,
          _wire("VAEEncode", "pixels", lambda g: nan_images(g, frames(g))), "latent"),
    Probe("inversion_zero_height_latent", "TVE_DDIMInversion", TINY, PNP,
          _wire("TVE_DDIMInversion", "latent", lambda g: zero_height_latent(g, g.out("VAEEncode"))), "latent"),
    Probe("inversion_sd3_latent", "TVE_DDIMInversion", FAMILY, PNP,
          _wire("TVE_DDIMInversion", "latent", sd3_latent), "latent"),
    Probe("inversion_of_another_latent_than_the_trajectories", "TVE_DDIMInversion", MISMATCH, TFF,
          _wire("TVE_FlowTrajectories", "latent", lambda g: g.add("LatentMultiply", samples=g.out("VAEEncode"),
                                                                  multiplier=0.5)), "trajectories"),
    # ------------------------------------------------------------------ Feature Injection
    Probe("injection_nan_end", "TVE_ApplyFeatureInjection", NON_FINITE, PNP,
          lambda g: g.set("TVE_ApplyFeatureInjection", attention_injection_end=math.nan), "attention_injection_end"),
    Probe("injection_v_prediction_patched_model", "TVE_ApplyFeatureInjection", MISMATCH, PNP,
          _wire("TVE_ApplyFeatureInjection", "model", lambda g: _v_prediction(g, g.out("CheckpointLoaderSimple"))),
          "model"),
    Probe("injection_samples_the_clean_latent", "TVE_ApplyFeatureInjection", MISMATCH, PNP,
          _wire("SamplerCustomAdvanced", "latent_image", lambda g: g.out("VAEEncode")), "latent_image",
          raised_by="SamplerCustomAdvanced"),
    Probe("injection_samples_another_videos_latent", "TVE_ApplyFeatureInjection", MISMATCH, PNP,
          _wire("SamplerCustomAdvanced", "latent_image", _other_video_inversion), "latent_image",
          raised_by="SamplerCustomAdvanced"),
    Probe("injection_sampled_on_another_sigma_grid", "TVE_ApplyFeatureInjection", MISMATCH, PNP,
          _wire("SamplerCustomAdvanced", "sigmas", lambda g: g.add(
              "BasicScheduler", model=g.out("CheckpointLoaderSimple"), scheduler="karras", steps=2, denoise=1.0)),
          "sigmas", raised_by="SamplerCustomAdvanced"),
    Probe("injection_with_new_noise", "TVE_ApplyFeatureInjection", MISMATCH, PNP,
          _wire("SamplerCustomAdvanced", "noise", lambda g: g.add("RandomNoise", noise_seed=1)), "noise",
          raised_by="SamplerCustomAdvanced"),
    # ------------------------------------------------------------------ Cross-Frame Attention
    Probe("cross_frame_nan_start", "TVE_ApplyCrossFrameAttention", NON_FINITE, CF,
          lambda g: g.set("TVE_ApplyCrossFrameAttention", start_percent=math.nan), "start_percent"),
    Probe("cross_frame_samples_a_nan_latent", "TVE_ApplyCrossFrameAttention", NON_FINITE, CF,
          _wire("SamplerCustomAdvanced", "latent_image", lambda g: nan_latent(g, g.out("TVE_DDIMInversion"))),
          "latent_image", raised_by="SamplerCustomAdvanced"),
    Probe("cross_frame_samples_a_zero_height_latent", "TVE_ApplyCrossFrameAttention", TINY, CF,
          _wire("SamplerCustomAdvanced", "latent_image", lambda g: zero_height_latent(g, g.out("TVE_DDIMInversion"))),
          "latent_image", raised_by="SamplerCustomAdvanced"),
    Probe("cross_frame_anchor_beyond_the_video", "TVE_ApplyCrossFrameAttention", MISMATCH, CF,
          lambda g: g.set("TVE_ApplyCrossFrameAttention", mode="anchor", anchor_frame=FRAMES + 3), "anchor_frame",
          raised_by="SamplerCustomAdvanced"),
    # ------------------------------------------------------------------ TokenFlow
    Probe("tokenflow_nan_end", "TVE_ApplyTokenFlow", NON_FINITE, TF,
          lambda g: g.set("TVE_ApplyTokenFlow", conv_injection_end=math.nan), "conv_injection_end"),
    Probe("tokenflow_sampled_by_a_v_prediction_patched_model", "TVE_ApplyTokenFlow", MISMATCH, TF,
          _wire("CFGGuider", "model", lambda g: _v_prediction(g, g.out("TVE_ApplyTokenFlow"))), "model",
          raised_by="SamplerCustomAdvanced"),
    Probe("tokenflow_samples_another_videos_latent", "TVE_ApplyTokenFlow", MISMATCH, TF,
          _wire("SamplerCustomAdvanced", "latent_image", _other_video_inversion), "latent_image",
          raised_by="SamplerCustomAdvanced"),
    # ------------------------------------------------------------------ FLATTEN
    Probe("flatten_trajectories_of_another_latent", "TVE_ApplyFLATTEN", MISMATCH, FL,
          _wire("TVE_FlowTrajectories", "latent", lambda g: g.add("LatentMultiply", samples=g.out("VAEEncode"),
                                                                  multiplier=-1.0)), "trajectories",
          raised_by="TVE_DDIMInversion"),
    # ------------------------------------------------------------------ Motion Dynamics
    Probe("motion_nan_motion_x", "TVE_MotionDynamicsLatents", NON_FINITE, T2V,
          lambda g: g.set("TVE_MotionDynamicsLatents", motion_x=math.nan), "motion_x"),
    Probe("motion_nan_cfg", "TVE_MotionDynamicsLatents", NON_FINITE, T2V,
          lambda g: g.set("TVE_MotionDynamicsLatents", cfg=math.nan), "cfg"),
    Probe("motion_zero_height_latent", "TVE_MotionDynamicsLatents", TINY, T2V,
          _wire("TVE_MotionDynamicsLatents", "latent", lambda g: zero_height_latent(g, g.out("EmptyLatentImage"))),
          "latent"),
    Probe("motion_sd3_latent", "TVE_MotionDynamicsLatents", FAMILY, T2V,
          _wire("TVE_MotionDynamicsLatents", "latent", lambda g: sd3_latent(g, 1)), "latent"),
    # ------------------------------------------------------------------ Consistency Metrics
    Probe("metrics_nan_frames", "TVE_ConsistencyMetrics", NON_FINITE, TF,
          _wire("TVE_ConsistencyMetrics", "images", lambda g: nan_images(g, g.out("VAEDecode"))), "images"),
    Probe("metrics_other_frame_count", "TVE_ConsistencyMetrics", MISMATCH, TF,
          _wire("TVE_ConsistencyMetrics", "images", lambda g: g.add("ImageFromBatch", image=g.out("VAEDecode"),
                                                                    batch_index=0, length=FRAMES - 1)), "images"),
    Probe("metrics_one_frame", "TVE_ConsistencyMetrics", TINY, TF,
          _wire("TVE_ConsistencyMetrics", "images", lambda g: g.add("ImageFromBatch", image=g.out("VAEDecode"),
                                                                    batch_index=0, length=1)), "images"),
    # ------------------------------------------------------------------ Preview Features
    Probe("features_nan_step", "TVE_PreviewFeatures", NON_FINITE, TF,
          lambda g: _with_preview_features(g, step_percent=math.nan), "step_percent"),
    Probe("features_v_prediction_patched_model", "TVE_PreviewFeatures", MISMATCH, TF,
          lambda g: _with_preview_features(g, model=_v_prediction(g, g.out("CheckpointLoaderSimple"))), "model"),
]

PROBES += [
    # ------------------------------------------------------------------ One-Shot Tune, temporal adapter files
    Probe("tune_nan_latent", "TVE_OneShotTune", NON_FINITE, EI2,
          _wire("TVE_OneShotTune", "latent", lambda g: nan_latent(g, g.out("VAEEncode"))), "latent"),
    Probe("tune_nan_learning_rate", "TVE_OneShotTune", NON_FINITE, EI2,
          lambda g: g.set("TVE_OneShotTune", learning_rate=math.nan), "learning_rate"),
    Probe("tune_one_frame", "TVE_OneShotTune", TINY, EI2,
          _wire("TVE_OneShotTune", "latent", lambda g: g.add("LatentFromBatch", samples=g.out("VAEEncode"),
                                                             batch_index=0, length=1)), "latent"),
    Probe("tune_sd3_latent", "TVE_OneShotTune", FAMILY, EI2, _wire("TVE_OneShotTune", "latent", sd3_latent), "latent"),
    Probe("save_adapter_outside_its_folder", "TVE_SaveTemporalAdapter", FILE, EI2,
          lambda g: g.set("TVE_SaveTemporalAdapter", filename_prefix="../outside"), "filename_prefix"),
    Probe("load_adapter_that_is_not_there", "TVE_LoadTemporalAdapter", FILE, EI2,
          _wire("CFGGuider", "model", lambda g: g.add("TVE_LoadTemporalAdapter", model=g.out("CheckpointLoaderSimple"),
                                                      adapter_name="missing.safetensors")),
          "adapter_name", validation=True, combo=True),
]

# Bad input that is now handled rather than refused: it must run to the end with a finite, correctly sized result.
HANDLED = [
    Probe("features_on_a_one_token_grid", "TVE_PreviewFeatures", TINY, "inversion_reconstruction.json",
          lambda g: (_wire("VAEEncode", "pixels", lambda g_: g_.add("ImageCrop", image=frames(g_), width=8, height=8,
                                                                     x=0, y=0))(g),
                     _with_preview_features(g, block="middle")), ""),
]


def broken(probe: Probe, object_info: dict) -> dict:
    g = Graph(with_overrides(to_api(load(WORKFLOW_DIR / probe.workflow), object_info), SMALL))
    probe.mutate(g)
    return g.nodes


def queue(comfyui, graph: dict) -> tuple[int, dict]:
    return comfyui.queue(graph)


def test_every_node_has_a_probe_of_every_class_that_applies(object_info):
    from tve.nodes import NODE_CLASS_MAPPINGS
    assert set(APPLICABLE) == set(NODE_CLASS_MAPPINGS)
    covered = {(p.node, p.kind) for p in PROBES + HANDLED}
    missing = sorted((node, kind) for node, kinds in APPLICABLE.items() for kind in kinds
                     if (node, kind) not in covered)
    assert not missing, missing
    for probe in PROBES + HANDLED:                     # every probe edits a graph the server would accept
        for node in broken(probe, object_info).values():
            assert node["class_type"] in object_info, node["class_type"]


def refused_by_validation(probe: Probe) -> bool:
    """Whether ComfyUI's prompt validation refuses the probe's bad input (else the node does when it runs). A combo
    value outside the options: 0.3.64 checks it only on V1 list combos, not on the V3 ``COMBO`` inputs of the pack's
    nodes, so there the node refuses it; 0.33.0 checks both."""
    from tve.engine import host
    release = tuple(int(part) for part in host.comfyui_version().split(".")[:3])
    return probe.validation and not (probe.combo and release <= (0, 3, 64))


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.name)
def test_bad_input_is_refused_naming_the_input(probe, comfyui, object_info):
    status, body = queue(comfyui, broken(probe, object_info))
    if refused_by_validation(probe):                     # the server runs the valid outputs of the prompt (200), or none (400)
        named = {node_id: [e.get("extra_info", {}).get("input_name") for e in n["errors"]]
                 for node_id, n in body.get("node_errors", {}).items() if n["class_type"] == probe.node}
        assert named and all(probe.input in names for names in named.values()), body
        if status == 200:
            entry = _wait(comfyui, body["prompt_id"])
            refused = {o for n in body["node_errors"].values() for o in n["dependent_outputs"]}
            assert not refused & set(entry["outputs"]), "an output of the refused node was produced"
        return
    assert status == 200, body
    entry = _wait(comfyui, body["prompt_id"])
    status_ = entry["status"]
    errors = [m[1] for m in status_["messages"] if m[0] == "execution_error"]
    assert status_["status_str"] == "error" and errors, f"{probe.name} ran to the end: nothing may be silent"
    error = errors[0]
    assert error["node_type"] == (probe.raised_by or probe.node), error
    assert error["exception_type"] in ("ValueError", "TypeError"), error
    assert re.match(rf"{re.escape(probe.input)}: ", error["exception_message"]), error["exception_message"]
    last_frame = [line for line in error["traceback"] if line.lstrip().startswith("File ")][-1]
    assert PACK_FOLDER in last_frame, f"raised outside the pack:\n{''.join(error['traceback'])}"


@pytest.mark.parametrize("probe", HANDLED, ids=lambda p: p.name)
def test_bad_input_that_is_now_handled_runs_to_the_end(probe, comfyui, object_info):
    status, body = queue(comfyui, broken(probe, object_info))
    assert status == 200, body
    entry = _wait(comfyui, body["prompt_id"])
    errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "success", errors
    graph = broken(probe, object_info)
    previews = [out["images"] for node_id, out in entry["outputs"].items()
                if graph[node_id]["class_type"] == "PreviewImage"]
    assert len(previews) == 1 and len(previews[0]) == FRAMES


def _wait(comfyui, prompt_id: str) -> dict:
    return comfyui.wait(prompt_id)


# ==============================================================================================================
# Issue 24: damaged, foreign and mismatched temporal adapter files, and noise masks the edit could not use. Self-
# contained: the adapter files are written into the server's models/tve_adapters by ``adapter_files``; each probe
# also says what its error must say beyond naming the input.
# ==============================================================================================================
@dataclass(frozen=True)
class SaysProbe(Probe):
    says: str = ""                  # a regex the error message must hold (why it was refused)


ADAPTER_FILES = {                   # file -> how it is damaged (see ``adapter_files``)
    "tve_e2e_good.safetensors": "an adapter for the e2e checkpoint",
    "tve_e2e_half.safetensors": "cut to half its bytes",
    "tve_e2e_empty.safetensors": "0 bytes",
    "tve_e2e_pickle.safetensors": "a torch.save checkpoint renamed",
    "tve_e2e_no_blocks.safetensors": "no 'blocks' metadata",
    "tve_e2e_steps_x.safetensors": "metadata steps='x'",
    "tve_e2e_no_gain.safetensors": "one tensor missing",
    "tve_e2e_k_shape.safetensors": "a temporal tensor of another shape",
    "tve_e2e_query_shape.safetensors": "a query delta that does not fit the model's weight",
    "tve_e2e_other_checkpoint.safetensors": "tuned on another checkpoint of the family",
}


def _e2e_unet(checkpoint_file, seed: int | None = None):
    """The e2e checkpoint's MODEL as the server's CheckpointLoaderSimple loads it (comfy's loader, on the CPU), or
    with random weights of ``seed`` instead (another checkpoint of the same family and layout)."""
    from tve.engine import host
    from tve.tests.hosts import _init_weights
    model = host.checkpoint_model(str(checkpoint_file))
    if seed is not None:
        _init_weights(model.model, seed)
    return model


def _e2e_adapter(model, identity_of):
    """An untuned 'stam' adapter with random query deltas for ``model``'s layout, recording ``identity_of``'s
    weights."""
    import torch
    from tve.attention.temporal import TemporalAttention
    from tve.engine import host
    from tve.engine.temporal_adapter import TemporalAdapter, model_blocks
    g = torch.Generator().manual_seed(0)
    blocks = model_blocks(model)
    temporal = {name: TemporalAttention(c, h, "stam", g).state_dict() for name, (c, h) in blocks.items()}
    diffs = {key: 1e-3 * torch.randn(model.get_model_object(key.rsplit(".", 1)[0]).weight.shape, generator=g)
             for b in host.attention_blocks(model) for key in host.query_weight_keys(b)}
    return TemporalAdapter("stam", host.model_family(model), blocks, temporal, diffs, "temporal+queries", 0, (),
                           identity=host.weights_fingerprint(identity_of))


@pytest.fixture(scope="module")
def adapter_files(e2e_root, checkpoint_file):
    """Every file of ``ADAPTER_FILES`` in the server's models/tve_adapters (``--base-directory``'s models)."""
    import pickle
    import safetensors
    import safetensors.torch
    import torch
    from tve.engine.temporal_adapter import save_adapter
    folder = e2e_root / "base" / "models" / "tve_adapters"
    folder.mkdir(parents=True, exist_ok=True)
    model = _e2e_unet(checkpoint_file)
    good = folder / "tve_e2e_good.safetensors"
    save_adapter(_e2e_adapter(model, model), str(good))
    save_adapter(_e2e_adapter(model, _e2e_unet(checkpoint_file, seed=1)), str(folder / "tve_e2e_other_checkpoint"
                                                                                       ".safetensors"))
    data = good.read_bytes()
    (folder / "tve_e2e_half.safetensors").write_bytes(data[:len(data) // 2])
    (folder / "tve_e2e_empty.safetensors").write_bytes(b"")
    torch.save({"q": torch.zeros(2)}, folder / "tve_e2e_pickle.safetensors", pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with safetensors.safe_open(str(good), framework="pt") as f:
        metadata, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}

    def variant(name, meta=None, drop=(), **changed):
        ts = {k: v for k, v in tensors.items() if k not in drop}
        ts.update({k.replace("__", "."): fn(ts[k.replace("__", ".")]) for k, fn in changed.items()})
        safetensors.torch.save_file(ts, str(folder / name), metadata={k: v for k, v in {**metadata, **(meta or {})}
                                                                      .items() if v is not None})

    block = next(k for k in tensors if k.startswith("temporal.")).rsplit(".", 1)[0]
    query = next(k for k in tensors if k.startswith("query."))
    variant("tve_e2e_no_blocks.safetensors", {"blocks": None})
    variant("tve_e2e_steps_x.safetensors", {"steps": "x"})
    variant("tve_e2e_no_gain.safetensors", drop=[f"{block}.gain"])
    variant("tve_e2e_k_shape.safetensors", **{f"{block}.k".replace(".", "__"): lambda t: t[:, :8].contiguous()})
    variant("tve_e2e_query_shape.safetensors", **{query.replace(".", "__"): lambda t: t[:, :8].contiguous()})
    assert sorted(p.name for p in folder.glob("tve_e2e_*.safetensors")) == sorted(ADAPTER_FILES)
    return folder


def _load_adapter_only(name: str, allow: bool | None = None) -> Callable[[Graph], None]:
    """The graph becomes: the checkpoint → Load Temporal Adapter (TVE) ``name`` → Save Temporal Adapter (TVE)."""
    from tve.tests.e2e.session_files import CHECKPOINT

    def mutate(g: Graph) -> None:
        g.nodes.clear()
        model = g.add("CheckpointLoaderSimple", ckpt_name=CHECKPOINT)
        inputs = {"model": model, "adapter_name": name, **({} if allow is None else {"allow_other_checkpoint": allow})}
        load = g.add("TVE_LoadTemporalAdapter", **inputs)
        g.add("TVE_SaveTemporalAdapter", adapter=[load[0], 1], filename_prefix="e2e_probe/resaved")
    return mutate


def _solid_mask(g: Graph, value: float, width: int = WIDTH, height: int = HEIGHT) -> list:
    return g.add("SolidMask", value=value, width=width, height=height)


def _masked(g: Graph, latent: list, mask: list) -> list:
    return g.add("SetLatentNoiseMask", samples=latent, mask=mask)


def _mask_with_a_nan_square(g: Graph) -> list:
    """A mask of the frames' size, 1 but for an 8x8 square of NaN (64 of WIDTH·HEIGHT values)."""
    return g.add("MaskComposite", destination=_solid_mask(g, 1.0), source=_solid_mask(g, math.nan, 8, 8), x=8, y=8,
                 operation="multiply")


def _four_masks(g: Graph) -> list:
    image = g.add("MaskToImage", mask=_solid_mask(g, 1.0))
    return g.add("ImageToMask", image=g.add("RepeatImageBatch", image=image, amount=4), channel="red")


_L = "TVE_LoadTemporalAdapter"
ISSUE_24_PROBES = [
    SaysProbe("load_adapter_cut_to_half_its_bytes", _L, FILE, EI2, _load_adapter_only("tve_e2e_half.safetensors"),
              "adapter_name", says=r"tve_e2e_half.safetensors is truncated: \d+ bytes, but its header"),
    SaysProbe("load_adapter_of_0_bytes", _L, FILE, EI2, _load_adapter_only("tve_e2e_empty.safetensors"),
              "adapter_name", says=r"tve_e2e_empty.safetensors is an empty file \(0 bytes\)"),
    SaysProbe("load_adapter_that_is_a_renamed_torch_checkpoint", _L, FILE, EI2,
              _load_adapter_only("tve_e2e_pickle.safetensors"), "adapter_name",
              says=r"is a PyTorch zip checkpoint \(torch.save\), not a safetensors file"),
    SaysProbe("load_adapter_without_blocks", _L, FILE, EI2, _load_adapter_only("tve_e2e_no_blocks.safetensors"),
              "adapter_name", says=r"its metadata has no 'blocks'; expected a JSON object"),
    SaysProbe("load_adapter_with_steps_x", _L, FILE, EI2, _load_adapter_only("tve_e2e_steps_x.safetensors"),
              "adapter_name", says=r"its metadata 'steps' is 'x'; expected a whole number"),
    SaysProbe("load_adapter_missing_a_tensor", _L, FILE, EI2, _load_adapter_only("tve_e2e_no_gain.safetensors"),
              "adapter_name", says=r"lacks temporal\.[\w.]+\.gain; a 'stam' temporal attention of block"),
    SaysProbe("load_adapter_with_a_tensor_of_another_shape", _L, FILE, EI2,
              _load_adapter_only("tve_e2e_k_shape.safetensors"), "adapter_name",
              says=r"its tensor 'temporal\.[\w.]+\.k' has shape \(320, 8\); expected \(320, 320\)"),
    SaysProbe("load_adapter_whose_query_delta_does_not_fit", _L, MISMATCH, EI2,
              _load_adapter_only("tve_e2e_query_shape.safetensors"), "adapter_name",
              says=r"its query delta for diffusion_model\.\S+\.to_q\.weight is \(320, 8\) but this model's weight is "
                   r"\(320, 320\)"),
    SaysProbe("load_adapter_tuned_on_another_checkpoint", _L, MISMATCH, EI2,
              _load_adapter_only("tve_e2e_other_checkpoint.safetensors"), "adapter_name",
              says=r"was tuned on a model whose weights differ from this model's: other base weights .*set "
                   r"allow_other_checkpoint"),
    SaysProbe("inversion_nan_noise_mask", "TVE_DDIMInversion", NON_FINITE, PNP,
              _wire("TVE_DDIMInversion", "latent", lambda g: _masked(g, g.out("VAEEncode"), _solid_mask(g, math.nan))),
              "latent", says=rf"its noise_mask has {WIDTH * HEIGHT} of {WIDTH * HEIGHT} values NaN or infinite"),
    SaysProbe("inversion_noise_mask_with_64_nan", "TVE_DDIMInversion", NON_FINITE, PNP,
              _wire("TVE_DDIMInversion", "latent", lambda g: _masked(g, g.out("VAEEncode"), _mask_with_a_nan_square(g))),
              "latent", says=rf"its noise_mask has 64 of {WIDTH * HEIGHT} values NaN or infinite"),
    SaysProbe("inversion_4_masks_on_6_frames", "TVE_DDIMInversion", MISMATCH, PNP,
              _wire("TVE_DDIMInversion", "latent", lambda g: _masked(g, g.out("VAEEncode"), _four_masks(g))),
              "latent", says=rf"its noise_mask has 4 masks but the latent has {FRAMES} frames; expected one mask per "
                             rf"frame \({FRAMES}\) or one for all frames"),
    SaysProbe("edit_with_a_nan_noise_mask_set_after_the_inversion", "TVE_ApplyFeatureInjection", NON_FINITE, PNP,
              _wire("SamplerCustomAdvanced", "latent_image",
                    lambda g: _masked(g, g.out("TVE_DDIMInversion"), _mask_with_a_nan_square(g))), "latent_image",
              raised_by="SamplerCustomAdvanced", says=r"its noise_mask has \d+ of \d+ values NaN or infinite"),
]
ISSUE_24_HANDLED = [
    Probe("load_adapter_for_this_checkpoint", _L, FILE, EI2, _load_adapter_only("tve_e2e_good.safetensors"), ""),
    Probe("load_adapter_of_another_checkpoint_when_allowed", _L, MISMATCH, EI2,
          _load_adapter_only("tve_e2e_other_checkpoint.safetensors", allow=True), ""),
]


@pytest.mark.parametrize("probe", ISSUE_24_PROBES, ids=lambda p: p.name)
def test_a_damaged_or_foreign_adapter_file_or_an_unusable_noise_mask_is_refused_naming_the_input(
        probe, comfyui, object_info, adapter_files):
    refused_saying(probe, comfyui, object_info)


def refused_saying(probe: SaysProbe, comfyui, object_info) -> None:
    """The probe's prompt ends in one error raised in the pack by the expected node, naming the input and saying
    ``probe.says`` (a ValueError, or the engine's Refused: a ValueError naming both nodes of a composition)."""
    status, body = queue(comfyui, broken(probe, object_info))
    assert status == 200, body
    entry = _wait(comfyui, body["prompt_id"])
    errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "error" and errors, f"{probe.name} ran to the end: nothing may be silent"
    error = errors[0]
    assert error["node_type"] == (probe.raised_by or probe.node), error
    assert error["exception_type"] == "ValueError" or error["exception_type"].endswith(".Refused"), error
    message = error["exception_message"]
    assert re.match(rf"{re.escape(probe.input)}: ", message) and re.search(probe.says, message), message
    last_frame = [line for line in error["traceback"] if line.lstrip().startswith("File ")][-1]
    assert PACK_FOLDER in last_frame, f"raised outside the pack:\n{''.join(error['traceback'])}"


@pytest.mark.parametrize("probe", ISSUE_24_HANDLED, ids=lambda p: p.name)
def test_an_adapter_for_this_checkpoint_or_one_explicitly_allowed_loads(probe, comfyui, object_info, adapter_files):
    graph = broken(probe, object_info)
    status, body = queue(comfyui, graph)
    assert status == 200, body
    entry = _wait(comfyui, body["prompt_id"])
    errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "success", errors
    (loader,) = [i for i, n in graph.items() if n["class_type"] == _L]
    said = entry["outputs"].get(loader, {}).get("text", [])           # other weights let through: said on the node
    if probe.kind == MISMATCH:
        assert len(said) == 1 and "was tuned on other weights than this model's: other base weights" in said[0], said
    else:
        assert said == [], said


# ==============================================================================================================
# Issue 24, items 3-5: an edit with other weights than the inversion's, windows too small for attention across
# frames, and settings of one node that replace another's. ``other_weights_files`` writes a LoRA for the e2e
# checkpoint into the server's models/loras and a second checkpoint of the same layout beside the first.
# ==============================================================================================================
STYLE_LORA = "tve_e2e_style_lora.safetensors"
OTHER_CHECKPOINT = "tve_e2e_tiny_sd15_other.safetensors"


@pytest.fixture(scope="module")
def other_weights_files(e2e_root, checkpoint_file):
    """A rank-2 LoRA (kohya keys) on every self- and cross-attention projection of the e2e checkpoint, and another
    checkpoint of its layout (other random weights)."""
    import safetensors.torch
    import torch
    from tve.engine import host
    from tve.tests.e2e.tiny_sd15 import write_tiny_sd15
    model = _e2e_unet(checkpoint_file)
    g = torch.Generator().manual_seed(3)
    keys = [f"{block.path}.{attn}.{proj}.weight" for block in host.attention_blocks(model)
            for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v")]
    state = {}
    for weight_key, (out_features, in_features) in host.weight_shapes(model, keys).items():
        name = "lora_unet_" + weight_key[len("diffusion_model."):-len(".weight")].replace(".", "_")
        state[f"{name}.lora_up.weight"] = 0.1 * torch.randn(out_features, 2, generator=g)
        state[f"{name}.lora_down.weight"] = 0.1 * torch.randn(2, in_features, generator=g)
        state[f"{name}.alpha"] = torch.tensor(2.0)
    loras = e2e_root / "base" / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(loras / STYLE_LORA))
    write_tiny_sd15(checkpoint_file.parent / OTHER_CHECKPOINT, seed=1)
    return loras / STYLE_LORA


def _with_lora(g: Graph, model: list) -> list:
    return g.add("LoraLoaderModelOnly", model=model, lora_name=STYLE_LORA, strength_model=0.8)


def _model_from_another_checkpoint(g: Graph, reader: str) -> None:
    """``reader``'s model from a second checkpoint of the same family and layout, through the same Frame Windows."""
    other = g.add("CheckpointLoaderSimple", ckpt_name=OTHER_CHECKPOINT)
    g.set(reader, model=g.add("TVE_FrameWindows", model=other, **{k: v for k, v in g.inputs("TVE_FrameWindows").items()
                                                                 if k != "model"}))


def _core_context_windows(g: Graph, model: list, length: int) -> list:
    """Core's Context Windows (Manual) over the frames (every other input at its default; 0.33's inputs, which
    earlier releases ignore where they lack them)."""
    return g.add("ContextWindowsManual", model=model, context_length=length, context_overlap=0,
                 context_schedule="standard_static", context_stride=1, closed_loop=False, fuse_method="pyramid", dim=0,
                 freenoise=False, cond_retain_index_list="", split_conds_to_windows=False, latent_retain_index_list="",
                 causal_window_fix=True)


_OTHER_WEIGHTS = r"made with a model whose weights differ from this model's: "
ISSUE_24_MODEL_PROBES = [
    SaysProbe("injection_with_a_lora_the_inversion_was_made_without", "TVE_ApplyFeatureInjection", MISMATCH, PNP,
              lambda g: g.set("TVE_ApplyFeatureInjection",
                              model=_with_lora(g, g.inputs("TVE_ApplyFeatureInjection")["model"])), "inversion",
              says=_OTHER_WEIGHTS + r"other weight patches \(a LoRA.*allow_other_weights on Apply Feature Injection"),
    SaysProbe("tokenflow_with_another_checkpoint_of_the_family", "TVE_ApplyTokenFlow", MISMATCH, TF,
              lambda g: _model_from_another_checkpoint(g, "TVE_ApplyTokenFlow"), "inversion",
              says=_OTHER_WEIGHTS + r"other base weights \(another checkpoint.*allow_other_weights on Apply TokenFlow"),
    SaysProbe("features_with_a_lora_the_inversion_was_made_without", "TVE_PreviewFeatures", MISMATCH, TF,
              lambda g: _with_preview_features(g, model=_with_lora(g, g.out("CheckpointLoaderSimple"))), "inversion",
              says=_OTHER_WEIGHTS + r"other weight patches"),
    SaysProbe("lora_added_after_the_injection_node", "TVE_ApplyFeatureInjection", MISMATCH, PNP,
              _wire("CFGGuider", "model", lambda g: _with_lora(g, g.out("TVE_ApplyFeatureInjection"))), "inversion",
              raised_by="SamplerCustomAdvanced", says=_OTHER_WEIGHTS + r"other weight patches"),
    SaysProbe("flatten_with_one_frame_per_window", "TVE_FrameWindows", TINY, FL,
              lambda g: g.set("TVE_FrameWindows", frames_per_window=1, overlap=0), "frames_per_window",
              raised_by="TVE_ApplyFLATTEN",
              says=r"1 frame per window leaves Apply FLATTEN \(TVE\) nothing to attend to"),
    SaysProbe("cross_frame_in_core_context_windows_of_one_frame", "TVE_ApplyCrossFrameAttention", TINY, CF,
              _wire("CFGGuider", "model", lambda g: _core_context_windows(g, g.out("TVE_ApplyCrossFrameAttention"), 1)),
              "context_length", raised_by="SamplerCustomAdvanced",
              says=r"gives every call 1 frame, which leaves Apply Cross-Frame Attention \(TVE\) nothing to attend to"),
]


@pytest.mark.parametrize("probe", ISSUE_24_MODEL_PROBES, ids=lambda p: p.name)
def test_other_weights_than_the_inversions_or_a_window_too_small_is_refused_naming_the_input(
        probe, comfyui, object_info, other_weights_files):
    refused_saying(probe, comfyui, object_info)


@dataclass(frozen=True)
class NoteProbe(Probe):
    says: str = ""                  # a regex the node's one UI text must match (also once in the server log)


def _injection_before_tokenflow(g: Graph) -> None:
    inputs = {"model": g.inputs("TVE_ApplyTokenFlow")["model"], "inversion": g.out("TVE_DDIMInversion", 1),
              "attention_injection_end": 0.5, "conv_injection_end": 0.8, "block_preset": "tokenflow",
              "order": "sigma-matched"}
    g.set("TVE_ApplyTokenFlow", model=g.add("TVE_ApplyFeatureInjection", **inputs))


ISSUE_24_NOTES = [
    NoteProbe("injection_with_a_lora_allowed", "TVE_ApplyFeatureInjection", MISMATCH, PNP,
              lambda g: g.set("TVE_ApplyFeatureInjection", allow_other_weights=True,
                              model=_with_lora(g, g.inputs("TVE_ApplyFeatureInjection")["model"])), "",
              says=r"^Apply Feature Injection \(TVE\): edits with other weights than the inversion was made with: "
                   r"other weight patches .*allowed by allow_other_weights"),
    NoteProbe("injection_before_tokenflow", "TVE_ApplyTokenFlow", MISMATCH, TF, _injection_before_tokenflow, "",
              says=r"^Apply TokenFlow \(TVE\): its PnP injection settings replace the PnP injection settings Apply "
                   r"Feature Injection \(TVE\) set on this model"),
]


@pytest.mark.parametrize("probe", ISSUE_24_NOTES, ids=lambda p: p.name)
def test_allowed_other_weights_and_replaced_settings_run_and_are_said_on_the_node_and_once_in_the_log(
        probe, comfyui, object_info, other_weights_files):
    graph = broken(probe, object_info)
    said_before = comfyui.log.read_text(encoding="utf-8", errors="replace").count("[TVE] ")
    status, body = queue(comfyui, graph)
    assert status == 200, body
    entry = _wait(comfyui, body["prompt_id"])
    errors = [m for m in entry["status"]["messages"] if m[0] == "execution_error"]
    assert entry["status"]["status_str"] == "success", errors
    (node_id,) = [i for i, n in graph.items() if n["class_type"] == probe.node]
    (note,) = entry["outputs"][node_id]["text"]
    assert re.search(probe.says, note), note
    log = comfyui.log.read_text(encoding="utf-8", errors="replace")
    assert log.count(f"[TVE] {note}") == 1 and log.count("[TVE] ") == said_before + 1, comfyui.log_tail()


# ==============================================================================================================
# Issue 25, item 2: FLATTEN's stored source features. The inversion keeps what FLATTEN's PnP blocks read; a reader
# of other features, and a sampler that evaluates between the grid's σ, are refused naming what to change; a
# stored edit runs and DDIM Inversion says on the node (and once in the log) what it holds.
# ==============================================================================================================
def _stored(g: Graph, **changes: dict) -> None:
    g.set("TVE_ApplyFLATTEN", source_features="stored")
    for class_type, values in changes.items():
        g.set(class_type, **values)


ISSUE_25_PROBES = [
    SaysProbe("stored_features_read_with_the_tokenflow_preset", "TVE_ApplyFeatureInjection", MISMATCH, FL,
              lambda g: _stored(g, TVE_ApplyFeatureInjection={"block_preset": "tokenflow"}), "inversion",
              says=r"keeps the source features of FLATTEN's PnP blocks .*Apply Feature Injection \(TVE\) reads "
                   r"others"),
    SaysProbe("stored_features_with_a_sampler_between_grid_sigmas", "TVE_ApplyFLATTEN", MISMATCH, FL,
              lambda g: _stored(g, KSamplerSelect={"sampler_name": "dpm_2"}), "sampler",
              raised_by="SamplerCustomAdvanced", says=r"between two σ of the inversion's grid.*source_features to live"),
]


@pytest.mark.parametrize("probe", ISSUE_25_PROBES, ids=lambda p: p.name)
def test_a_reader_or_sampler_the_stored_source_features_do_not_serve_is_refused_naming_the_input(
        probe, comfyui, object_info):
    refused_saying(probe, comfyui, object_info)


def test_a_flatten_edit_with_stored_source_features_runs_and_the_inversion_says_what_it_holds(
        comfyui, object_info):
    keep_all = {"TVE_ApplyFLATTEN": {"stored_steps": 1.0}}       # settings no probe before ran (no cached outputs)
    probe = NoteProbe("stored_source_features", "TVE_DDIMInversion", MISMATCH, FL, lambda g: _stored(g, **keep_all),
                      "",
                      says=r"^DDIM Inversion \(TVE\): stored source features for (\d+) of \1 steps, \d+ frames: "
                           r"[\d.]+ MiB \([\d.]+ MiB per frame\)$")
    test_allowed_other_weights_and_replaced_settings_run_and_are_said_on_the_node_and_once_in_the_log(
        probe, comfyui, object_info, None)
