"""Writes the pack's example workflows, ``workflows/*.json`` in ComfyUI's UI format, from the specs below.

Run from the repository root, with the node definitions taken from one of:

    COMFYUI_PATH=/path/to/ComfyUI python tools/build_workflows.py            # ComfyUI + this pack, in-process, CPU
    python tools/build_workflows.py --object-info http://127.0.0.1:8188    # a running ComfyUI that has the pack
    python tools/build_workflows.py --object-info object_info.json         # a saved /object_info response

A spec gives each node's widget values and links by name; /object_info supplies the widget order, the socket
types and the defaults, so each file is what the frontend would save. ``tests/e2e`` checks that the files are
what this tool writes and runs every one of them on a headless ComfyUI.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = ROOT / "workflows"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")                  # the frontend adds a control widget after these INTs
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
CONTROL_VALUE = "fixed"                              # control_after_generate: keep the seed as shipped
UPLOAD_VALUE = "image"                               # the value the frontend stores for its upload button

COLUMN_WIDTH, NODE_WIDTH, ROW_GAP = 380, 320, 40
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT = 30, 22, 26
MULTILINE_HEIGHT, PREVIEW_HEIGHT, NOTE_LINE_HEIGHT = 90, 220, 18


@dataclass(frozen=True)
class Node:
    """One node: widget values by input name, links as ``input name -> (node name, output name)``."""
    name: str
    type: str
    column: int
    widgets: Mapping[str, Any] = field(default_factory=dict)
    links: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    title: str | None = None
    properties: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Note:
    """A frontend-only text node."""
    name: str
    column: int
    text: str


# ---------------------------------------------------------------------------------------------- specs
SD15_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
SD15_URL = ("https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
            "v1-5-pruned-emaonly-fp16.safetensors?download=true")
RAFT_LARGE = "raft_large_C_T_SKHT_V2-ff5fadd5.pth"
SOURCE_VIDEO = "source_video.mp4"
TARGET_PROMPT = "a watercolor painting, soft washes of colour, paper texture"
NEGATIVE_PROMPT = "blurry, low quality, distorted, flickering"


def checkpoint(column: int = 0) -> Node:
    return Node("checkpoint", "CheckpointLoaderSimple", column, {"ckpt_name": SD15_CHECKPOINT},
                properties={"models": [{"name": SD15_CHECKPOINT, "url": SD15_URL, "directory": "checkpoints"}]})


def source_frames() -> list[Node]:
    """LoadVideo → frames → VAE latents (columns 0-2)."""
    return [
        Node("video", "LoadVideo", 0, {"file": SOURCE_VIDEO}, title="Source video"),
        Node("components", "GetVideoComponents", 1, links={"video": ("video", "VIDEO")}),
        Node("encode", "VAEEncode", 2, links={"pixels": ("components", "images"), "vae": ("checkpoint", "VAE")}),
    ]


def prompt(name: str, column: int, text: str, title: str) -> Node:
    return Node(name, "CLIPTextEncode", column, {"text": text}, {"clip": ("checkpoint", "CLIP")}, title=title)


def inversion(steps: int = 50, model: tuple[str, str] = ("checkpoint", "MODEL"), column: int = 3) -> list[Node]:
    """The source prompt and TVE_DDIMInversion of the encoded frames with ``model``."""
    return [
        prompt("source_prompt", column - 1, "", "Source prompt (empty is usual)"),
        Node("inversion", "TVE_DDIMInversion", column, {"steps": steps, "scheduler": "ddim_uniform"},
             {"model": model, "latent": ("encode", "LATENT"), "conditioning": ("source_prompt", "CONDITIONING")}),
    ]


def sample_and_save(column: int, guider: tuple[str, str], prefix: str,
                    sigmas: tuple[str, str] = ("inversion", "sigmas"),
                    latent: tuple[str, str] = ("inversion", "inverted_latent"),
                    fps: tuple[str, str] | None = ("components", "fps")) -> list[Node]:
    """SamplerCustomAdvanced from ``latent`` on the σ grid ``sigmas`` with no new noise, decode, save."""
    return [
        Node("no_noise", "DisableNoise", column - 1),
        Node("sampler", "KSamplerSelect", column - 1, {"sampler_name": "euler"}),
        Node("sample", "SamplerCustomAdvanced", column,
             links={"noise": ("no_noise", "NOISE"), "guider": guider, "sampler": ("sampler", "SAMPLER"),
                    "sigmas": sigmas, "latent_image": latent}),
        Node("decode", "VAEDecode", column + 1, links={"samples": ("sample", "output"), "vae": ("checkpoint", "VAE")}),
        Node("to_video", "CreateVideo", column + 2, {"fps": 8.0 if fps is None else 24.0},
             {"images": ("decode", "IMAGE"), **({"fps": fps} if fps else {})}),
        Node("save", "SaveVideo", column + 3, {"filename_prefix": f"video/{prefix}"}, {"video": ("to_video", "VIDEO")}),
    ]


def optical_flow(column: int) -> Node:
    return Node("flow", "TVE_OpticalFlow", column,
                {"method": "raft_large", "raft_weights": RAFT_LARGE, "batch_size": 8},
                {"images": ("components", "images")},
                properties={"models": [{"name": RAFT_LARGE, "directory": "optical_flow",
                                        "url": f"https://download.pytorch.org/models/{RAFT_LARGE}"}]})


def flatten(column: int) -> list[Node]:
    """Flow → trajectories on the encoded latent → FLATTEN on the checkpoint's model (columns ``column``..+2)."""
    return [
        optical_flow(column),
        Node("trajectories", "TVE_FlowTrajectories", column + 1, {"seed": 0, "cut_at_occlusions": True},
             {"flow": ("flow", "flow"), "latent": ("encode", "LATENT")}),
        Node("flatten", "TVE_ApplyFLATTEN", column + 2, {"token_grids": "highest resolution",
                                                          "qk_source": "dense_output"},
             {"model": ("checkpoint", "MODEL"), "trajectories": ("trajectories", "trajectories")}),
    ]


def tokenflow(column: int, model: tuple[str, str]) -> Node:
    return Node("tokenflow", "TVE_ApplyTokenFlow", column,
                {"keyframe_interval": 8, "seed": 0, "propagation": "paper", "attention_injection_end": 0.5,
                 "conv_injection_end": 0.8},
                {"model": model, "inversion": ("inversion", "inversion")})


def consistency(column: int, flow_column: int | None = None) -> list[Node]:
    """Warp error and flicker of the edit under the source flow (adds the flow node when ``flow_column``)."""
    nodes = [optical_flow(flow_column)] if flow_column is not None else []
    return nodes + [Node("metrics", "TVE_ConsistencyMetrics", column,
                         links={"images": ("decode", "IMAGE"), "flow": ("flow", "flow"),
                                "source_images": ("components", "images")}, title="Consistency")]


def edit_prompts() -> list[Node]:
    return [prompt("target_prompt", 1, TARGET_PROMPT, "Target prompt (the edit)"),
            prompt("negative_prompt", 1, NEGATIVE_PROMPT, "Negative prompt")]


def injection() -> Node:
    return Node("injection", "TVE_ApplyFeatureInjection", 4,
                {"attention_injection_end": 0.5, "conv_injection_end": 0.8, "block_preset": "tokenflow",
                 "order": "sigma-matched"},
                {"model": ("checkpoint", "MODEL"), "inversion": ("inversion", "inversion")})


def cfg_guider(column: int, model: tuple[str, str]) -> Node:
    return Node("guider", "CFGGuider", column, {"cfg": 7.5},
                {"model": model, "positive": ("target_prompt", "CONDITIONING"),
                 "negative": ("negative_prompt", "CONDITIONING")})


FLOW_NOTE = """Optical flow and FLATTEN trajectories of a video.

• Optical Flow: 'raft_large' (best) needs raft_large_C_T_SKHT_V2-ff5fadd5.pth in models/optical_flow \
(https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth); 'raft_small' needs \
raft_small_C_T_V2-01064c6d.pth; 'dis' (OpenCV) needs no weights and runs on the CPU.
• Preview Flow: colour = direction, saturation = speed; white in the occlusion mask = no match in the next frame.
• The checkpoint is only used for its VAE: trajectories are built on the latent grid the edit will use.
• Preview Trajectories: 'grid' picks the token grid (latent, /2, /4, /8); 'tracks' how many to draw."""

RECONSTRUCTION_NOTE = """DDIM inversion round trip: invert the video, then sample it back with the same σ grid.

• The output should match the input; if it does not, the edit workflows cannot preserve the video either.
• steps: 50 is the papers' choice; fewer is faster and less exact.
• The source prompt is usually empty; guidance is 1 (BasicGuider), as in the inversion.
• SamplerCustomAdvanced takes the inversion's SIGMAS, DisableNoise and the inverted latent: no new noise."""

PNP_NOTE = """Plug-and-Play editing: each frame is edited from its own inverted latent, while the decoder's \
self-attention q/k and one ResBlock's features come from the source video at the same noise level.

• Target prompt: describe the whole edited video; cfg 7.5 as in the papers.
• attention_injection_end / conv_injection_end: fraction of the steps with injection. Higher keeps more of \
the source layout and motion; lower lets the prompt change more.
• block_preset: 'tokenflow' (TokenFlow's blocks) or 'flatten' (FLATTEN's).
• Frames are edited independently here: expect flicker. See anchor_attention_edit for cross-frame attention."""

ANCHOR_NOTE = """PnP editing with anchor-frame attention (Text2Video-Zero §3.3): every frame's self-attention \
attends to the anchor frame, which ties appearance across frames and reduces flicker.

• anchor_frame: the frame all others look at (0 = first); anchor_include_self also keeps each frame's own tokens.
• mode: 'keyframes' (TokenFlow), 'dense' (FLATTEN, all frames; memory grows with frames²), \
'fine_coarse' (EI²) are the other cross-frame modes.
• token_grids / start_percent / end_percent limit where and when it applies."""

TOKENFLOW_NOTE = """TokenFlow (Geyer et al., ICLR 2024): each step edits random keyframes together (extended \
attention + PnP injection) and carries their self-attention outputs to every frame along nearest-neighbour \
matches of the SOURCE video's features, so all frames share the keyframes' look.

• keyframe_interval: one keyframe per this many frames, re-drawn every step (8 in the paper). Smaller = more \
keyframes = closer to per-frame editing (and more memory for the keyframe pass).
• propagation: 'paper' blends the two keyframes nearest in time; 'official' reproduces the reference code.
• attention/conv_injection_end: how long the source structure is enforced (0.5 / 0.8 in the paper).
• Consistency Metrics: warp error of the edit under the source flow; compare with pnp_per_frame_edit."""

FLATTEN_NOTE = """FLATTEN (Cong et al., ICLR 2024): dense spatio-temporal attention in every block plus \
attention along the source's optical-flow trajectories, used for the inversion AND the edit (same MODEL).

• Optical Flow: RAFT weights in models/optical_flow, or 'dis' on the CPU.
• token_grids: 'highest resolution' (the paper) or 'all'. qk_source: 'dense_output' (the paper) or 'projections'.
• Injection uses FLATTEN's block preset. Dense attention costs frames² compute: long videos are slow."""

TOKENFLOW_FLATTEN_NOTE = """FLATTEN and TokenFlow stacked: FLATTEN shapes the inversion and the keyframe pass, \
TokenFlow propagates the keyframes. Apply FLATTEN first; TokenFlow must be the last attention patch."""

T2V_ZERO_NOTE = """Text2Video-Zero (Khachatryan et al., ICCV 2023): zero-shot text-to-video with an image model.

• Motion Dynamics Latents: one noise, denoised to t1 and t0 (44/47 of 50 steps), translated by motion_x/y latent \
cells per frame, re-noised: the start latents of all frames. Its sigmas output is the rest of the schedule.
• Cross-frame attention 'anchor': every frame attends to frame 0, which keeps the subject's appearance."""

EI2_NOTE = """EI² one-shot editing (Zhang et al., NeurIPS 2023; Tune-A-Video's recipe): tune the model on the \
clip, invert the clip with the tuned model, edit from the inversion with the target prompt.

• Apply Cross-Frame Attention 'fine_coarse' (FFAM): each frame sees its own tokens and the other frames' pooled \
ones, during tuning and editing (the tuned MODEL keeps it).
• One-Shot Tune: 'stam' is EI²'s shift-restricted temporal attention, 'layernorm' Tune-A-Video's. steps 300 at \
3e-5 is a start (Tune-A-Video: 500); the loss graph should fall and flatten. Tuning is cached while its inputs \
stay the same; change the seed to tune again.
• Source prompt: describe the clip as it is; it conditions the tuning and the inversion.
• Save Temporal Adapter writes models/tve_adapters/*.safetensors; Load Temporal Adapter puts it back on the \
same checkpoint later (no re-tuning)."""

WORKFLOWS: dict[str, list[Node | Note]] = {
    "optical_flow_preview.json": [
        Note("note", 0, FLOW_NOTE),
        *source_frames(),
        checkpoint(1),
        optical_flow(2),
        Node("preview_flow", "TVE_PreviewFlow", 3, links={"flow": ("flow", "flow")}, title="Flow and occlusion"),
        Node("trajectories", "TVE_FlowTrajectories", 3, {"seed": 0, "cut_at_occlusions": True},
             {"flow": ("flow", "flow"), "latent": ("encode", "LATENT")}),
        Node("preview_tracks", "TVE_PreviewTrajectories", 4, {"grid": "latent", "tracks": 64, "seed": 0},
             {"trajectories": ("trajectories", "trajectories"), "images": ("components", "images")},
             title="Trajectories"),
    ],
    "inversion_reconstruction.json": [
        Note("note", 0, RECONSTRUCTION_NOTE),
        checkpoint(),
        *source_frames(),
        *inversion(),
        Node("guider", "BasicGuider", 4, links={"model": ("checkpoint", "MODEL"),
                                                "conditioning": ("source_prompt", "CONDITIONING")}),
        *sample_and_save(5, ("guider", "GUIDER"), "TVE_reconstruction"),
    ],
    "pnp_per_frame_edit.json": [
        Note("note", 0, PNP_NOTE),
        checkpoint(),
        *source_frames(),
        *edit_prompts(),
        *inversion(),
        injection(),
        cfg_guider(5, ("injection", "MODEL")),
        *sample_and_save(6, ("guider", "GUIDER"), "TVE_pnp_edit"),
    ],
    "anchor_attention_edit.json": [
        Note("note", 0, ANCHOR_NOTE),
        checkpoint(),
        *source_frames(),
        *edit_prompts(),
        *inversion(),
        injection(),
        Node("cross_frame", "TVE_ApplyCrossFrameAttention", 5,
             {"mode": "anchor", "keyframe_interval": 8, "anchor_frame": 0, "anchor_include_self": False,
              "coarse_factor": 2, "seed": 0, "token_grids": "all", "start_percent": 0.0, "end_percent": 1.0},
             {"model": ("injection", "MODEL")}),
        cfg_guider(6, ("cross_frame", "MODEL")),
        *sample_and_save(7, ("guider", "GUIDER"), "TVE_anchor_edit"),
    ],
    "tokenflow_edit.json": [
        Note("note", 0, TOKENFLOW_NOTE),
        checkpoint(),
        *source_frames(),
        *edit_prompts(),
        *inversion(),
        tokenflow(4, ("checkpoint", "MODEL")),
        cfg_guider(5, ("tokenflow", "MODEL")),
        *sample_and_save(6, ("guider", "GUIDER"), "TVE_tokenflow_edit"),
        *consistency(9, flow_column=8),
    ],
    "flatten_edit.json": [
        Note("note", 0, FLATTEN_NOTE),
        checkpoint(),
        *source_frames(),
        *edit_prompts(),
        *flatten(3),
        *inversion(model=("flatten", "MODEL"), column=6),
        Node("injection", "TVE_ApplyFeatureInjection", 7,
             {"attention_injection_end": 0.8, "conv_injection_end": 0.8, "block_preset": "flatten",
              "order": "sigma-matched"},
             {"model": ("flatten", "MODEL"), "inversion": ("inversion", "inversion")}),
        cfg_guider(8, ("injection", "MODEL")),
        *sample_and_save(9, ("guider", "GUIDER"), "TVE_flatten_edit"),
        *consistency(12),
    ],
    "tokenflow_flatten_edit.json": [
        Note("note", 0, TOKENFLOW_FLATTEN_NOTE),
        checkpoint(),
        *source_frames(),
        *edit_prompts(),
        *flatten(3),
        *inversion(model=("flatten", "MODEL"), column=6),
        tokenflow(7, ("flatten", "MODEL")),
        cfg_guider(8, ("tokenflow", "MODEL")),
        *sample_and_save(9, ("guider", "GUIDER"), "TVE_tokenflow_flatten_edit"),
        *consistency(12),
    ],
    "ei2_one_shot_edit.json": [
        Note("note", 0, EI2_NOTE),
        checkpoint(),
        *source_frames(),
        *edit_prompts(),
        prompt("source_prompt", 2, "a video of shapes moving over a background", "Source prompt (describe the clip)"),
        Node("cross_frame", "TVE_ApplyCrossFrameAttention", 2,
             {"mode": "fine_coarse", "keyframe_interval": 8, "anchor_frame": 0, "anchor_include_self": False,
              "coarse_factor": 2, "seed": 0, "token_grids": "all", "start_percent": 0.0, "end_percent": 1.0},
             {"model": ("checkpoint", "MODEL")}),
        Node("tune", "TVE_OneShotTune", 3,
             {"steps": 300, "learning_rate": 3e-5, "seed": 0, "kind": "stam", "trainable": "temporal+queries",
              "gradient_checkpointing": True},
             {"model": ("cross_frame", "MODEL"), "latent": ("encode", "LATENT"),
              "conditioning": ("source_prompt", "CONDITIONING")}),
        Node("save_adapter", "TVE_SaveTemporalAdapter", 4, {"filename_prefix": "tve_one_shot"},
             {"adapter": ("tune", "adapter")}),
        Node("show_loss", "PreviewImage", 4, links={"images": ("tune", "loss_graph")}, title="Loss"),
        Node("inversion", "TVE_DDIMInversion", 4, {"steps": 50, "scheduler": "ddim_uniform"},
             {"model": ("tune", "model"), "latent": ("encode", "LATENT"),
              "conditioning": ("source_prompt", "CONDITIONING")}),
        cfg_guider(5, ("tune", "model")),
        *sample_and_save(6, ("guider", "GUIDER"), "TVE_ei2_edit"),
    ],
    "text2video_zero.json": [
        Note("note", 0, T2V_ZERO_NOTE),
        checkpoint(),
        prompt("target_prompt", 1, "a horse galloping on a street, photorealistic", "Prompt"),
        prompt("negative_prompt", 1, NEGATIVE_PROMPT, "Negative prompt"),
        Node("size", "EmptyLatentImage", 1, {"width": 512, "height": 512, "batch_size": 1}),
        Node("motion", "TVE_MotionDynamicsLatents", 2,
             {"seed": 0, "frames": 8, "motion_x": -1.5, "motion_y": -1.5, "steps": 50, "cfg": 7.5,
              "scheduler": "ddim_uniform", "t0": 44, "t1": 47},
             {"model": ("checkpoint", "MODEL"), "positive": ("target_prompt", "CONDITIONING"),
              "negative": ("negative_prompt", "CONDITIONING"), "latent": ("size", "LATENT")}),
        Node("cross_frame", "TVE_ApplyCrossFrameAttention", 3,
             {"mode": "anchor", "keyframe_interval": 8, "anchor_frame": 0, "anchor_include_self": False,
              "coarse_factor": 2, "seed": 0, "token_grids": "all", "start_percent": 0.0, "end_percent": 1.0},
             {"model": ("checkpoint", "MODEL")}),
        cfg_guider(4, ("cross_frame", "MODEL")),
        *sample_and_save(5, ("guider", "GUIDER"), "TVE_text2video_zero", sigmas=("motion", "sigmas"),
                         latent=("motion", "latent"), fps=None),
    ],
}


# ---------------------------------------------------------------------------------------------- object_info
def input_specs(info: Mapping) -> list[tuple[str, list, bool]]:
    """(name, spec, optional) of every required and optional input, in /object_info ``input_order``."""
    return [(name, list(info["input"][group][name]), group == "optional")
            for group in ("required", "optional") for name in info["input_order"].get(group, [])]


def input_type(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def input_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: list) -> bool:
    return input_type(spec) in WIDGET_TYPES and not input_options(spec).get("forceInput")


def is_upload(spec: list) -> bool:
    return any(input_options(spec).get(flag) for flag in UPLOAD_FLAGS)


def has_control(name: str, spec: list) -> bool:
    """The frontend adds a control_after_generate widget to inputs that ask for one and, unless they say
    ``control_after_generate: False``, to INTs named seed / noise_seed."""
    default = input_type(spec) == "INT" and name in SEED_NAMES
    return bool(input_options(spec).get("control_after_generate", default))


def widget_layout(info: Mapping) -> list[tuple[str, str]]:
    """What each ``widgets_values`` entry holds, as (input name, "value" | "control" | "upload"): the widgets in
    input order, a control value after each seed, the upload button's value after the required widgets."""
    layout = []
    for optional in (False, True):
        group = [(n, s) for n, s, opt in input_specs(info) if opt == optional and is_widget(s)]
        for name, spec in group:
            layout.append((name, "value"))
            if has_control(name, spec):
                layout.append((name, "control"))
        if not optional and any(is_upload(spec) for _, spec in group):
            layout.append(("upload", "upload"))
    return layout


def types_match(output: str, accepted: str) -> bool:
    return accepted == "*" or output in accepted.split(",")


def widget_default(node: Node, name: str, spec: list) -> Any:
    options = input_options(spec)
    if "default" in options:
        return options["default"]
    kind = input_type(spec)
    if kind == "COMBO":
        raise ValueError(f"{node.name} ({node.type}): '{name}' has no default; give it a value in the spec")
    return {"INT": options.get("min", 0), "FLOAT": options.get("min", 0.0), "STRING": "", "BOOLEAN": False}[kind]


# ---------------------------------------------------------------------------------------------- building
def build_workflow(spec: list[Node | Note], object_info: Mapping) -> dict:
    """The UI-format workflow of ``spec``: node ids in spec order, links numbered as they are made."""
    ids = {item.name: i for i, item in enumerate(spec, start=1)}
    if len(ids) != len(spec):
        raise ValueError("spec: node names must be unique")
    nodes = {item.name: _note(item) if isinstance(item, Note) else _node(item, object_info) for item in spec}
    links = []
    for item in spec:
        if isinstance(item, Note):
            continue
        for slot, entry in enumerate(nodes[item.name]["inputs"]):
            if entry["name"] in item.links:
                links.append(_link(len(links) + 1, item, entry, slot, nodes, ids))
    for item in spec:
        node = nodes[item.name]
        node["id"] = ids[item.name]
        node["size"] = [NODE_WIDTH, _height(node, object_info)]
    _lay_out(spec, nodes)
    _number_execution_order(list(nodes.values()), links)
    ordered = [nodes[item.name] for item in spec]
    return {"last_node_id": len(ordered), "last_link_id": len(links), "nodes": ordered, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _link(link_id: int, item: Node, entry: dict, slot: int, nodes: dict, ids: dict) -> list:
    """Connect ``item``'s input ``entry`` (at ``slot``) to the output its spec names; returns the link row."""
    source_name, output_name = item.links[entry["name"]]
    source = nodes.get(source_name)
    if source is None or source["type"] == "Note":
        raise ValueError(f"{item.name}.{entry['name']}: links to unknown node '{source_name}'")
    names = [o["name"] for o in source["outputs"]]
    if output_name not in names:
        raise ValueError(f"{item.name}.{entry['name']}: {source['type']} has no output '{output_name}' "
                         f"(it has {names})")
    output = source["outputs"][names.index(output_name)]
    if not types_match(output["type"], entry["type"]):
        raise ValueError(f"{item.name}.{entry['name']}: expects {entry['type']}, "
                         f"{source_name}.{output_name} gives {output['type']}")
    entry["link"] = link_id
    output["links"] = (output["links"] or []) + [link_id]
    return [link_id, ids[source_name], output["slot_index"], ids[item.name], slot, output["type"]]


def _note(note: Note) -> dict:
    return {"type": "Note", "flags": {}, "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "widgets_values": [note.text], "color": "#432", "bgcolor": "#653"}


def _node(node: Node, object_info: Mapping) -> dict:
    """Sockets (then linked widgets), outputs and positional widget values of ``node``, as the frontend saves them."""
    if node.type not in object_info:
        raise ValueError(f"{node.name}: node type '{node.type}' is not in /object_info (is its pack loaded?)")
    info = object_info[node.type]
    specs = {name: (spec, optional) for name, spec, optional in input_specs(info)}
    for name in [*node.widgets, *node.links]:
        if name not in specs:
            raise ValueError(f"{node.name} ({node.type}): no input '{name}' (it has {sorted(specs)})")
    for name in node.widgets:
        if not is_widget(specs[name][0]):
            raise ValueError(f"{node.name} ({node.type}): '{name}' is a socket, not a widget")
    unlinked = [n for n, (s, optional) in specs.items() if not optional and not is_widget(s) and n not in node.links]
    if unlinked:
        raise ValueError(f"{node.name} ({node.type}): required inputs {unlinked} are not linked")
    sockets = [{"name": n, "type": input_type(s), "link": None} | ({"shape": 7} if optional else {})
               for n, (s, optional) in specs.items() if not is_widget(s)]
    linked_widgets = [{"name": n, "type": input_type(s), "widget": {"name": n}, "link": None}
                      for n, (s, _) in specs.items() if is_widget(s) and n in node.links]
    special = {"control": CONTROL_VALUE, "upload": UPLOAD_VALUE}
    values = [(node.widgets[n] if n in node.widgets else widget_default(node, n, specs[n][0]))
              if role == "value" else special[role] for n, role in widget_layout(info)]
    outputs = [{"name": name, "type": kind, "links": None, "slot_index": i}
               for i, (name, kind) in enumerate(zip(info["output_name"], info["output"]))]
    title = {"title": node.title} if node.title else {}
    return {"type": node.type, "flags": {}, "mode": 0, "inputs": sockets + linked_widgets, "outputs": outputs,
            **title, "properties": {"Node name for S&R": node.type, **node.properties}, "widgets_values": values}


def _height(node: dict, object_info: Mapping) -> int:
    """Body height (LiteGraph's size leaves out the title bar) for the slots, widgets and any preview."""
    if node["type"] == "Note":
        lines = sum(1 + len(line) // 48 for line in node["widgets_values"][0].splitlines())
        return lines * NOTE_LINE_HEIGHT + 20
    info = object_info[node["type"]]
    widgets = [s for _, s, _ in input_specs(info) if is_widget(s)]
    height = max(len(node["inputs"]), len(node["outputs"])) * SLOT_HEIGHT + 10
    height += len(node["widgets_values"]) * WIDGET_HEIGHT
    height += MULTILINE_HEIGHT * sum(1 for s in widgets if input_options(s).get("multiline"))
    previews = info.get("output_node") or any(is_upload(s) for s in widgets)
    return height + (PREVIEW_HEIGHT if previews else 0)


def _lay_out(spec: list[Node | Note], nodes: dict[str, dict]) -> None:
    """Columns left to right; within a column, nodes stacked top to bottom in spec order."""
    next_y: dict[int, int] = {}
    for item in spec:
        node = nodes[item.name]
        y = next_y.get(item.column, 0)
        node["pos"] = [item.column * COLUMN_WIDTH, y]
        next_y[item.column] = y + TITLE_HEIGHT + node["size"][1] + ROW_GAP


def _number_execution_order(nodes: list[dict], links: list[list]) -> None:
    """``order``: a topological order (sources first, ties by id), as the frontend stores it."""
    waiting = {n["id"]: {link[1] for link in links if link[3] == n["id"]} for n in nodes}
    rank = {}
    while waiting:
        ready = min(i for i, deps in waiting.items() if not deps)
        rank[ready] = len(rank)
        del waiting[ready]
        for deps in waiting.values():
            deps.discard(ready)
    for node in nodes:
        node["order"] = rank[node["id"]]


def build_all(object_info: Mapping) -> dict[str, dict]:
    return {name: build_workflow(spec, object_info) for name, spec in WORKFLOWS.items()}


def render(workflow: dict) -> str:
    """The file text: the key order the frontend uses, two-space indent, a final newline."""
    keys = ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "title", "properties",
            "widgets_values", "color", "bgcolor")
    nodes = [{k: node[k] for k in keys if k in node} for node in workflow["nodes"]]
    return json.dumps({**workflow, "nodes": nodes}, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------- node definitions
def object_info_from(source: str) -> dict:
    """/object_info of a running ComfyUI (URL) or a saved response (file)."""
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source.rstrip("/") + "/object_info", timeout=60) as response:
            return json.load(response)
    return json.loads(Path(source).read_text(encoding="utf-8"))


def object_info_in_process(comfyui: Path, node_types: set[str]) -> dict:
    """Definitions of ``node_types`` from ComfyUI's nodes and this pack, imported here on the CPU (as the
    server's /object_info reports them)."""
    sys.path.insert(0, str(comfyui.resolve()))
    from comfy.cli_args import args
    args.cpu = True
    import asyncio

    import nodes
    from comfy_api.internal import _ComfyNodeInternal
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(ROOT))):
        raise SystemExit(f"the pack at {ROOT} failed to import; see the traceback above")
    info = {}
    for node_type in sorted(node_types & set(nodes.NODE_CLASS_MAPPINGS)):
        cls = nodes.NODE_CLASS_MAPPINGS[node_type]
        if issubclass(cls, _ComfyNodeInternal):
            info[node_type] = cls.GET_NODE_INFO_V1()
            continue
        inputs = cls.INPUT_TYPES()
        info[node_type] = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                           "output": list(cls.RETURN_TYPES),
                           "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
                           "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    return json.loads(json.dumps(info))                 # tuples become lists, as in the server's JSON


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--object-info", help="URL of a running ComfyUI with the pack, or a saved /object_info "
                                              "JSON file (default: import $COMFYUI_PATH in-process)")
    args = parser.parse_args()
    if args.object_info:
        object_info = object_info_from(args.object_info)
    elif os.environ.get("COMFYUI_PATH"):
        used = {item.type for spec in WORKFLOWS.values() for item in spec if isinstance(item, Node)}
        object_info = object_info_in_process(Path(os.environ["COMFYUI_PATH"]), used)
    else:
        parser.error("set COMFYUI_PATH to a ComfyUI checkout or pass --object-info")
    WORKFLOW_DIR.mkdir(exist_ok=True)
    for name, workflow in build_all(object_info).items():
        (WORKFLOW_DIR / name).write_text(render(workflow), encoding="utf-8")
        print(f"wrote workflows/{name}: {len(workflow['nodes'])} nodes, {len(workflow['links'])} links")


if __name__ == "__main__":
    main()
