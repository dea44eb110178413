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
import math
import os
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_DIR = ROOT / "workflows"
# The oldest ComfyUI the pack supports. Core nodes are written in its form (tools/floor_core_nodes.json, its
# /object_info of them): a newer frontend loads such a file and gives the nodes what they gained since (a trailing
# optional widget at its default, a new output), while an older one would keep a newer form's extra values and
# outputs as stale entries. `--save-floor` on that release rewrites the snapshot; tests/e2e checks it there.
FLOOR_VERSION = "0.3.64"
FLOOR_NODES = ROOT / "tools" / "floor_core_nodes.json"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")                  # the frontend adds a control widget after these INTs
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
CONTROL_VALUE = "fixed"                              # control_after_generate: keep the seed as shipped
UPLOAD_VALUE = "image"                               # the value the frontend stores for its upload button

COLUMN_WIDTH, NODE_WIDTH, ROW_GAP = 380, 320, 40
TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT = 30, 22, 26
MULTILINE_HEIGHT, PREVIEW_HEIGHT = 90, 220
# A Markdown note's text as frontends 1.27 and 1.48 render it in a node 320 wide (measured: ~50 characters a line,
# 14 px a line, a blank line half of one, a heading nearly two); the box leaves a tenth or more to spare.
NOTE_TYPE, NOTE_CHARS_PER_LINE, NOTE_LINE_HEIGHT, NOTE_PADDING = "MarkdownNote", 50, 14, 45
# The view a file opens at (the editor restores it): 100 %, the graph's top left a little in from the canvas's.
VIEW = {"scale": 1, "offset": [80, 90]}
GROUP_PADDING, GROUP_TITLE_HEIGHT, GROUP_FONT_SIZE, GROUP_COLOR = 15, 50, 24, "#3f789e"
TOP = GROUP_PADDING + GROUP_TITLE_HEIGHT + TITLE_HEIGHT    # first node's body: its group's frame starts at y = 0


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
    group: str | None = None         # the titled frame (UI group) the node sits in


@dataclass(frozen=True)
class Note:
    """A frontend-only text node (Markdown)."""
    name: str
    column: int
    text: str
    group: str | None = None
    title: str | None = None


# ---------------------------------------------------------------------------------------------- specs
SD15_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
SD15_URL = ("https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
            "v1-5-pruned-emaonly-fp16.safetensors?download=true")
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SDXL_URL = "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors"
RAFT_LARGE = "raft_large_C_T_SKHT_V2-ff5fadd5.pth"
RAFT_SMALL = "raft_small_C_T_V2-01064c6d.pth"
RAFT_URL = "https://download.pytorch.org/models/"
NO_RAFT = "none (method dis)"                      # TVE_OpticalFlow's raft_weights entry when the folder is empty
SOURCE_VIDEO = "source_video.mp4"
TARGET_PROMPT = "a watercolor painting, soft washes of colour, paper texture"
NEGATIVE_PROMPT = "blurry, low quality, distorted, flickering"

# Groups: what the graph does, left to right.
LOAD, PROMPT, INVERT, EDIT, SAVE = "Load", "Prompt", "Invert", "Edit", "Save"
TUNE = "Tune"                                        # EI²'s one-shot tuning

# What an artist sets before the first Queue: these nodes' titles start with their number, the short Note at the
# top left names them in order, and they lie in the first screen (the view the file opens at, at 100 %).
NUMBERS = "①②③④⑤"


def first(number: int, title: str) -> str:
    return f"{NUMBERS[number - 1]} {title}"


@dataclass(frozen=True)
class Model:
    """A checkpoint family a workflow is written for: its file, the frame size it was trained on, what it costs."""
    name: str
    checkpoint: str
    url: str
    long_side: int               # px: frames are resized to this on their longer side (aspect kept)
    frames: int                  # the shipped frame count
    base_gb: float               # VRAM estimate: fp16 weights (UNet, text encoders, VAE) + CUDA context + VAE work
    per_frame_gb: float          # VRAM estimate per frame at ``long_side`` 16:9 held in one pass
    window: int                  # Frame Windows (TVE): frames one pass holds


# Estimates, not measurements. SD1.5: UNet 1.7 GB + CLIP-L 0.25 + VAE 0.16 fp16, ~0.6 GB of context and VAE
# decode work; per frame (64x36 latent): ComfyUI's own activation estimate for SD1.5 with flash attention
# (area x 2 B x 0.01 MiB = 46 MiB per latent) for cond + uncond, 1.5x headroom, plus the source pass and TVE's
# stored features: ~0.3 GB. SDXL: UNet 5.1 + CLIP-L/G 1.6 + VAE 0.16, ~0.8 GB work; a 128x72 latent is 4x the
# tokens, factor 0.8: ~1.1 GB per frame.
SD15 = Model("SD1.5", SD15_CHECKPOINT, SD15_URL, long_side=512, frames=16, base_gb=2.7, per_frame_gb=0.3, window=16)
SDXL = Model("SDXL", SDXL_CHECKPOINT, SDXL_URL, long_side=1024, frames=8, base_gb=7.7, per_frame_gb=1.1, window=8)


# ------------------------------------------------------------------ the Notes: a short one to start, one with details
def start_note(title: str, what: str, steps: list[str], after: str = "") -> Note:
    """The short Note at the top left: what the workflow does and the numbered nodes to set, in order."""
    numbered = "\n".join(f"- {NUMBERS[i]} {step}" for i, step in enumerate(steps))
    text = f"## {title}\n{what}\n\n**Set first**, then press Queue:\n\n{numbered}\n\n{after}".rstrip()
    return Note("start", 0, text + "\n\nMore: the **Details** Note below.", group=LOAD, title="Start here")


def video_steps(model: Model = SD15, prompt: str | None = "the edit, in words") -> list[str]:
    steps = [f"**Load Checkpoint**: your {model.name} checkpoint",
             "**Source video**: your clip (upload or pick)",
             f"**Frames (start, number)**: first frame, number of frames ({model.frames})"]
    return steps + ([f"**Target prompt (the edit)**: {prompt}"] if prompt else [])


def details_note(text: str, column: int = 0, group: str = LOAD) -> Note:
    return Note("details", column, text, group=group, title="Details")


def vram_line(model: Model) -> str:
    height = round(model.long_side * 9 / 16)
    windowed = model.base_gb + model.window * model.per_frame_gb
    figures = ", ".join(f"{n} ≈ {model.base_gb + n * model.per_frame_gb:.0f} GB" for n in (8, 16, 32) if n != model.window)
    return (f"- **VRAM** (an estimate from the model and latent sizes, fp16, {model.long_side}×{height}): Frame "
            f"Windows (TVE) holds {model.window} frames per pass, ≈ {windowed:.0f} GB for a video of any length; "
            f"frames_per_window {figures}. Lower it or the long side if it does not fit.")


# bench/workflow_memory.py (docs/workflows.md, "RAM"): the server's peak grows with the frames, almost all in
# core's nodes.
RAM_LINE = ("- **RAM** grows with the frames, almost all in core's nodes (measured on the CPU, 854×480 clip at "
            "128 px: about 42 MiB per frame at the peak): Get Video Components holds the whole clip decoded at full "
            "size and the frame range a copy; VAE Encode/Decode code all frames in one batch on the CPU. TVE's nodes "
            "add 1–2.5 MiB per frame. To cap it: fewer frames per run (③); core VAE Encode/Decode (Tiled) code one "
            "frame at a time (10–17 MiB per frame, slower); on ComfyUI 0.33+, core Trim Video between the video and "
            "Get Video Components decodes only that span.")


def frames_lines(model: Model = SD15, vram: bool = True) -> str:
    """What every video workflow's Details say about the frames: range, size, VRAM, RAM, fps and audio."""
    return f"""- **Frames (start, number)** (core Get Image from Batch): batch_index is the first frame, length the \
number of frames ({model.frames} shipped); a longer length takes what the clip has, a start past the clip's end \
takes its last frame. A clip with no frames stops at **Resize (long side)** (core), before any TVE node.
- **Resize (long side)** scales the frames to {model.long_side} px on the long side (aspect kept), the size the \
model was trained for; any size works, VAEEncode and every TVE node crop to a multiple of 8 the same way.
{vram_line(model) + chr(10) if vram else ""}{RAM_LINE}
- **fps and audio** go through to the saved video; the audio is in sync from start frame 0 (with a later start it \
still begins at the clip's start: trim it with core TrimAudioDuration if your clip has sound)."""


def raft_line(flow_title: str) -> str:
    return (f"- **{flow_title}** runs method 'dis' (OpenCV, CPU): nothing to download. For RAFT (sharper flow): "
            f"fetch {RAFT_LARGE} from {RAFT_URL}{RAFT_LARGE} into models/optical_flow, press R in the editor "
            f"(refresh), pick it in raft_weights and method 'raft_large' ('raft_small' takes {RAFT_SMALL}). max_resolution "
            "caps the size the flow is estimated at (RAFT's memory grows with its 4th power).")


# ---------------------------------------------------------------------------------------------- nodes
def checkpoint(model: Model = SD15, windows: bool = True) -> list[Node]:
    """The artist's checkpoint and the frames its TVE passes hold at a time (Frame Windows, bounded memory)."""
    loader = Node("checkpoint", "CheckpointLoaderSimple", 0, {"ckpt_name": model.checkpoint},
                  title=first(1, "Load Checkpoint"), group=LOAD,
                  properties={"models": [{"name": model.checkpoint, "url": model.url, "directory": "checkpoints"}]})
    return [loader] + ([Node("windows", "TVE_FrameWindows", 0, {"frames_per_window": model.window, "overlap": 4},
                             {"model": ("checkpoint", "MODEL")}, group=LOAD)] if windows else [])


def source_frames(model: Model = SD15) -> list[Node]:
    """LoadVideo → a range of frames → resized to the model's size → VAE latents (column 1)."""
    return [
        Node("video", "LoadVideo", 1, {"file": SOURCE_VIDEO}, title=first(2, "Source video"), group=LOAD),
        Node("components", "GetVideoComponents", 1, links={"video": ("video", "VIDEO")}, group=LOAD),
        Node("frames", "ImageFromBatch", 1, {"batch_index": 0, "length": model.frames},
             {"image": ("components", "images")}, title=first(3, "Frames (start, number)"), group=LOAD),
        Node("resize", "ImageScaleToMaxDimension", 1, {"upscale_method": "lanczos", "largest_size": model.long_side},
             {"image": ("frames", "IMAGE")}, title="Resize (long side)", group=LOAD),
        Node("encode", "VAEEncode", 1, links={"pixels": ("resize", "IMAGE"), "vae": ("checkpoint", "VAE")},
             group=LOAD),
    ]


FRAMES = ("resize", "IMAGE")                         # the source frames every node of a workflow works on


def prompt(name: str, column: int, text: str, title: str, group: str = PROMPT) -> Node:
    return Node(name, "CLIPTextEncode", column, {"text": text}, {"clip": ("checkpoint", "CLIP")}, title=title,
                group=group)


def edit_prompts(column: int = 2) -> list[Node]:
    """The target prompt (the fourth thing to set) and the negative one, in their own group right of Load."""
    return [prompt("target_prompt", column, TARGET_PROMPT, first(4, "Target prompt (the edit)")),
            prompt("negative_prompt", column, NEGATIVE_PROMPT, "Negative prompt")]


def inversion(steps: int = 50, model: tuple[str, str] = ("windows", "MODEL"), column: int = 4) -> list[Node]:
    """The source prompt and TVE_DDIMInversion of the encoded frames with ``model``."""
    return [
        prompt("source_prompt", column - 1, "", "Source prompt (empty is usual)", group=INVERT),
        Node("inversion", "TVE_DDIMInversion", column, {"steps": steps, "scheduler": "ddim_uniform"},
             {"model": model, "latent": ("encode", "LATENT"), "conditioning": ("source_prompt", "CONDITIONING")},
             group=INVERT),
    ]


def sample_and_save(column: int, guider: tuple[str, str], prefix: str,
                    sigmas: tuple[str, str] = ("inversion", "sigmas"),
                    latent: tuple[str, str] = ("inversion", "inverted_latent"),
                    video: bool = True, group: str = EDIT) -> list[Node]:
    """SamplerCustomAdvanced from ``latent`` on the σ grid ``sigmas`` with no new noise, decode, save (with the
    source video's fps and audio when ``video``)."""
    carried = {"fps": ("components", "fps"), "audio": ("components", "audio")} if video else {}
    return [
        Node("no_noise", "DisableNoise", column - 1, group=group),
        Node("sampler", "KSamplerSelect", column - 1, {"sampler_name": "euler"}, group=group),
        Node("sample", "SamplerCustomAdvanced", column,
             links={"noise": ("no_noise", "NOISE"), "guider": guider, "sampler": ("sampler", "SAMPLER"),
                    "sigmas": sigmas, "latent_image": latent}, group=group),
        Node("decode", "VAEDecode", column + 1, links={"samples": ("sample", "output"), "vae": ("checkpoint", "VAE")},
             group=SAVE),
        Node("to_video", "CreateVideo", column + 2, {"fps": 24.0 if video else 8.0},
             {"images": ("decode", "IMAGE"), **carried}, group=SAVE),
        Node("save", "SaveVideo", column + 3, {"filename_prefix": f"video/{prefix}"}, {"video": ("to_video", "VIDEO")},
             group=SAVE),
    ]


FLOW_TITLE = "Optical flow (dis: no download)"


def optical_flow(column: int, group: str = INVERT, name: str = "flow") -> Node:
    """TVE_OpticalFlow by DIS (OpenCV): no weights to miss, so a shipped workflow runs as it opens; the Details
    Note says how to switch to RAFT."""
    return Node(name, "TVE_OpticalFlow", column, {"method": "dis", "raft_weights": NO_RAFT, "batch_size": 8,
                                                  "max_resolution": 512},
                {"images": FRAMES, "vae": ("checkpoint", "VAE")}, title=FLOW_TITLE, group=group)


def flatten(column: int) -> list[Node]:
    """Flow → trajectories on the encoded latent → FLATTEN on the checkpoint's model (columns ``column``..+2)."""
    return [
        optical_flow(column),
        Node("trajectories", "TVE_FlowTrajectories", column + 1, {"seed": 0, "cut_at_occlusions": True},
             {"flow": ("flow", "flow"), "latent": ("encode", "LATENT")}, group=INVERT),
        Node("flatten", "TVE_ApplyFLATTEN", column + 2, {"token_grids": "highest resolution",
                                                          "qk_source": "dense_output"},
             {"model": ("windows", "MODEL"), "trajectories": ("trajectories", "trajectories")}, group=INVERT),
    ]


def tokenflow(column: int, model: tuple[str, str]) -> Node:
    return Node("tokenflow", "TVE_ApplyTokenFlow", column,
                {"keyframe_interval": 8, "seed": 0, "propagation": "paper", "attention_injection_end": 0.5,
                 "conv_injection_end": 0.8},
                {"model": model, "inversion": ("inversion", "inversion")}, group=EDIT)


def consistency(column: int, flow_column: int | None = None) -> list[Node]:
    """Warp error and flicker of the edit under the source flow. With ``flow_column`` the branch gets its own
    flow, by DIS: no weights to miss and no GPU memory, so the measurement cannot fail a run that saved its video."""
    nodes = [optical_flow(flow_column, group=SAVE)] if flow_column is not None else []
    return nodes + [Node("metrics", "TVE_ConsistencyMetrics", column,
                         links={"images": ("decode", "IMAGE"), "flow": ("flow", "flow"), "source_images": FRAMES},
                         title="Consistency", group=SAVE)]


def injection(column: int, model: tuple[str, str] = ("windows", "MODEL"), block_preset: str = "tokenflow",
              attention_end: float = 0.5) -> Node:
    return Node("injection", "TVE_ApplyFeatureInjection", column,
                {"attention_injection_end": attention_end, "conv_injection_end": 0.8, "block_preset": block_preset,
                 "order": "sigma-matched"},
                {"model": model, "inversion": ("inversion", "inversion")}, group=EDIT)


def cfg_guider(column: int, model: tuple[str, str]) -> Node:
    return Node("guider", "CFGGuider", column, {"cfg": 7.5},
                {"model": model, "positive": ("target_prompt", "CONDITIONING"),
                 "negative": ("negative_prompt", "CONDITIONING")}, group=EDIT)


# ---------------------------------------------------------------------------------------------- workflows
FLOW_DETAILS = f"""Optical flow of the frames and the FLATTEN trajectories it gives on the latent grid.
- The frames are resized to 512 px on the long side like the editing workflows, and the flow covers exactly the \
pixels VAEEncode encodes (a centre crop to a multiple of 8), so the trajectories are those an edit would use.
{raft_line(FLOW_TITLE)}
- **VRAM** (an estimate from RAFT's correlation volumes): ≈ 0.3 GB for a batch of 8 frame pairs at 512×288 in \
fp16, besides the VAE; a batch that does not fit is halved. 'dis' uses none.
- **Preview Flow**: colour = direction, saturation = speed; white in the occlusion mask = no match in the next frame.
- **Preview Trajectories**: 'grid' picks the token grid (latent, /2, /4, /8); 'tracks' how many to draw.
{frames_lines(vram=False)}"""

RECONSTRUCTION_DETAILS = f"""DDIM inversion round trip: invert the video, then sample it back with the same σ grid.
- The output should match the input; if it does not, the edit workflows cannot preserve the video either.
- steps: 50 is the papers' choice; fewer is faster and less exact.
- The source prompt is usually empty; guidance is 1 (BasicGuider), as in the inversion.
- SamplerCustomAdvanced takes the inversion's SIGMAS, DisableNoise and the inverted latent: no new noise.
{frames_lines()}"""

PNP_DETAILS = f"""Each frame is edited from its own inverted latent, while the decoder's self-attention q/k and one \
ResBlock's features come from the source video at the same noise level (Plug-and-Play).
- **Target prompt**: describe the whole edited video; cfg 7.5 as in the papers.
- attention_injection_end / conv_injection_end: fraction of the steps with injection. Higher keeps more of the \
source layout and motion; lower lets the prompt change more.
- block_preset: 'tokenflow' (TokenFlow's blocks) or 'flatten' (FLATTEN's).
- Frames are edited independently here: expect flicker. See anchor_attention_edit for cross-frame attention.
{frames_lines()}"""

ANCHOR_DETAILS = f"""PnP editing where every frame's self-attention attends to the anchor frame (Text2Video-Zero \
§3.3), which ties appearance across frames and reduces flicker.
- anchor_frame: the frame all others look at (0 = first); anchor_include_self also keeps each frame's own tokens.
- mode: 'keyframes' (TokenFlow), 'dense' (FLATTEN, all frames; memory grows with frames²), 'fine_coarse' (EI²) \
are the other cross-frame modes.
- token_grids / start_percent / end_percent limit where and when it applies.
{frames_lines()}"""


def tokenflow_details(model: Model) -> str:
    return f"""TokenFlow (Geyer et al., ICLR 2024){' with SDXL' if model is SDXL else ''}: each step edits random \
keyframes together (extended attention + PnP injection) and carries their self-attention outputs to every frame \
along nearest-neighbour matches of the SOURCE video's features, so all frames share the keyframes' look.
- keyframe_interval: one keyframe per this many frames, re-drawn every step (8 in the paper). Smaller = more \
keyframes = closer to per-frame editing (and more memory for the keyframe pass).
- propagation: 'paper' blends the two keyframes nearest in time; 'official' reproduces the reference code.
- attention/conv_injection_end: how long the source structure is enforced (0.5 / 0.8 in the paper).
- **Consistency**: warp error of the edit under the source flow; compare with pnp_per_frame_edit. It never \
stops the video from being saved.
{raft_line(FLOW_TITLE)}
{frames_lines(model)}"""


FLATTEN_DETAILS = f"""FLATTEN (Cong et al., ICLR 2024): dense spatio-temporal attention in every block plus \
attention along the source's optical-flow trajectories, used for the inversion AND the edit (same MODEL).
{raft_line(FLOW_TITLE)}
- token_grids: 'highest resolution' (the paper) or 'all'. qk_source: 'dense_output' (the paper) or 'projections'.
- Injection uses FLATTEN's block preset. Dense attention costs frames² compute: long videos are slow.
- source_features: 'live' (a source pass each step) or 'stored' (the official's: the inversion keeps the injected \
features; edits ~25 % faster, ~400 MiB RAM per frame at 512 px SD1.5, 50 steps): for short clips and many prompts.
{frames_lines()}"""

TOKENFLOW_FLATTEN_DETAILS = f"""FLATTEN and TokenFlow stacked: FLATTEN shapes the inversion and the keyframe pass, \
TokenFlow propagates the keyframes. Apply FLATTEN first; TokenFlow must be the last attention patch.
{raft_line(FLOW_TITLE)}
{frames_lines()}"""

TOKENFLOW_CONTROLNET_DETAILS = f"""Canny edges of the SOURCE frames (core Canny) guide the edit through core Apply \
ControlNet; TVE gives each keyframe pass the keyframes' own edge maps (stacks of several ControlNets / \
T2I-Adapters work the same way).
- **ControlNet**: an SD1.5 canny ControlNet in models/controlnet, e.g. control_v11p_sd15_canny_fp16.safetensors \
(https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors). One hint image per frame (or one for all).
- strength 0.8 / end_percent 1.0: how strongly and how long the edges hold the edit to the source's outlines.
- TokenFlow settings as in tokenflow_edit.json.
{frames_lines()}"""

EI2_DETAILS = f"""EI² one-shot editing (Zhang et al., NeurIPS 2023; Tune-A-Video's recipe): tune the model on the \
clip, invert the clip with the tuned model, edit from the inversion with the target prompt.
- **Tuning** (an estimate): backpropagation keeps activations of every frame, about twice the edit's VRAM with \
gradient checkpointing on; the temporal modules add ≈0.3 GB of fp32 weights for SD1.5.
- Apply Cross-Frame Attention 'fine_coarse' (FFAM): each frame sees its own tokens and the other frames' pooled \
ones, during tuning and editing (the tuned MODEL keeps it).
- One-Shot Tune: 'stam' is EI²'s shift-restricted temporal attention, 'layernorm' Tune-A-Video's. steps 300 at \
3e-5 is a start (Tune-A-Video: 500); the loss graph should fall and flatten. Tuning is cached while its inputs \
stay the same; change the seed to tune again.
- **Source prompt**: describe the clip as it is; it conditions the tuning and the inversion.
- Save Temporal Adapter writes models/tve_adapters/*.safetensors; Load Temporal Adapter puts it back on the same \
checkpoint later (no re-tuning).
{frames_lines()}"""

T2V_ZERO_DETAILS = """Text2Video-Zero (Khachatryan et al., ICCV 2023): zero-shot text-to-video with an image model.
- **Frames and motion** (Motion Dynamics Latents): one noise, denoised to t1 and t0 (44/47 of 50 steps), translated \
by motion_x/y latent cells per frame, re-noised: the start latents of all frames. Its sigmas output is the rest \
of the schedule.
- Cross-frame attention 'anchor': every frame attends to frame 0, which keeps the subject's appearance.
- **VRAM** (an estimate, fp16, 512×512): ≈ 3 GB + 0.5 GB per frame (all frames in one batch)."""


def tokenflow_workflow(model: Model, prefix: str) -> list[Node | Note]:
    return [
        start_note(f"TokenFlow video edit{' (SDXL)' if model is SDXL else ''}",
                   "Edits a clip with a prompt; the edit follows the clip's motion.", video_steps(model)),
        *checkpoint(model=model),
        details_note(tokenflow_details(model)),
        *source_frames(model),
        *edit_prompts(),
        *inversion(),
        tokenflow(5, ("windows", "MODEL")),
        cfg_guider(5, ("tokenflow", "MODEL")),
        *sample_and_save(7, ("guider", "GUIDER"), prefix),
        *consistency(9, flow_column=8),
    ]


CONTROLNET_CANNY = "control_v11p_sd15_canny_fp16.safetensors"
CONTROLNET_CANNY_URL = ("https://huggingface.co/comfyanonymous/ControlNet-v1-1_fp16_safetensors/resolve/main/"
                        "control_v11p_sd15_canny_fp16.safetensors")


def canny_controlnet(column: int) -> list[Node]:
    """Core Canny on the source frames → ControlNetLoader → ControlNetApplyAdvanced on the edit prompts."""
    return [
        Node("canny", "Canny", column - 1, {"low_threshold": 0.4, "high_threshold": 0.8}, {"image": FRAMES},
             group=EDIT),
        Node("controlnet", "ControlNetLoader", column - 1, {"control_net_name": CONTROLNET_CANNY}, group=EDIT,
             properties={"models": [{"name": CONTROLNET_CANNY, "url": CONTROLNET_CANNY_URL,
                                     "directory": "controlnet"}]}),
        Node("apply_controlnet", "ControlNetApplyAdvanced", column,
             {"strength": 0.8, "start_percent": 0.0, "end_percent": 1.0},
             {"positive": ("target_prompt", "CONDITIONING"), "negative": ("negative_prompt", "CONDITIONING"),
              "control_net": ("controlnet", "CONTROL_NET"), "image": ("canny", "IMAGE")}, group=EDIT),
    ]


WORKFLOWS: dict[str, list[Node | Note]] = {
    "optical_flow_preview.json": [
        start_note("Optical flow preview", "Shows the optical flow of a clip and the trajectories FLATTEN would "
                   "follow.", video_steps(prompt=None),
                   "Only the checkpoint's VAE is used."),
        *checkpoint(windows=False),                          # its VAE only: no model pass to window
        details_note(FLOW_DETAILS),
        *source_frames(),
        optical_flow(2, group="Flow"),
        Node("trajectories", "TVE_FlowTrajectories", 3, {"seed": 0, "cut_at_occlusions": True},
             {"flow": ("flow", "flow"), "latent": ("encode", "LATENT")}, group="Flow"),
        Node("preview_flow", "TVE_PreviewFlow", 4, links={"flow": ("flow", "flow")}, title="Flow and occlusion",
             group="Preview"),
        Node("preview_tracks", "TVE_PreviewTrajectories", 4, {"grid": "latent", "tracks": 64, "seed": 0},
             {"trajectories": ("trajectories", "trajectories"), "images": FRAMES}, title="Trajectories",
             group="Preview"),
    ],
    "inversion_reconstruction.json": [
        start_note("DDIM inversion round trip", "Inverts a clip and samples it back: the output should match "
                   "the input. No prompt needed.", video_steps(prompt=None)),
        *checkpoint(),
        details_note(RECONSTRUCTION_DETAILS),
        *source_frames(),
        *inversion(column=3),
        Node("guider", "BasicGuider", 4, links={"model": ("windows", "MODEL"),
                                                "conditioning": ("source_prompt", "CONDITIONING")}, group=EDIT),
        *sample_and_save(5, ("guider", "GUIDER"), "TVE_reconstruction"),
    ],
    "pnp_per_frame_edit.json": [
        start_note("Plug-and-Play edit, frame by frame", "Edits each frame with a prompt, keeping the source's "
                   "layout (the baseline: it flickers).", video_steps()),
        *checkpoint(),
        details_note(PNP_DETAILS),
        *source_frames(),
        *edit_prompts(),
        *inversion(),
        injection(5),
        cfg_guider(5, ("injection", "MODEL")),
        *sample_and_save(7, ("guider", "GUIDER"), "TVE_pnp_edit"),
    ],
    "anchor_attention_edit.json": [
        start_note("Anchor-attention edit", "Edits a clip with a prompt; every frame looks at one anchor frame, "
                   "which reduces flicker.", video_steps()),
        *checkpoint(),
        details_note(ANCHOR_DETAILS),
        *source_frames(),
        *edit_prompts(),
        *inversion(),
        injection(5),
        Node("cross_frame", "TVE_ApplyCrossFrameAttention", 5,
             {"mode": "anchor", "keyframe_interval": 8, "anchor_frame": 0, "anchor_include_self": False,
              "coarse_factor": 2, "seed": 0, "token_grids": "all", "start_percent": 0.0, "end_percent": 1.0},
             {"model": ("injection", "MODEL")}, group=EDIT),
        cfg_guider(6, ("cross_frame", "MODEL")),
        *sample_and_save(8, ("guider", "GUIDER"), "TVE_anchor_edit"),
    ],
    "tokenflow_controlnet_edit.json": [
        start_note("TokenFlow edit with a ControlNet", "Edits a clip with a prompt; the source's Canny edges hold "
                   "the outlines.", video_steps(),
                   f"Needs an SD1.5 canny ControlNet ({CONTROLNET_CANNY}) in models/controlnet."),
        *checkpoint(),
        details_note(TOKENFLOW_CONTROLNET_DETAILS),
        *source_frames(),
        *edit_prompts(),
        *inversion(),
        *canny_controlnet(6),
        tokenflow(6, ("windows", "MODEL")),
        Node("guider", "CFGGuider", 7, {"cfg": 7.5},
             {"model": ("tokenflow", "MODEL"), "positive": ("apply_controlnet", "positive"),
              "negative": ("apply_controlnet", "negative")}, group=EDIT),
        *sample_and_save(9, ("guider", "GUIDER"), "TVE_tokenflow_controlnet_edit"),
    ],
    "tokenflow_edit.json": tokenflow_workflow(SD15, "TVE_tokenflow_edit"),
    "tokenflow_sdxl_edit.json": tokenflow_workflow(SDXL, "TVE_tokenflow_sdxl_edit"),
    "flatten_edit.json": [
        start_note("FLATTEN video edit", "Edits a clip with a prompt; attention follows the clip's optical flow.",
                   video_steps(), "The flow runs 'dis': nothing to download (RAFT: see Details)."),
        *checkpoint(),
        details_note(FLATTEN_DETAILS),
        *source_frames(),
        *edit_prompts(),
        *flatten(3),
        *inversion(model=("flatten", "MODEL"), column=6),
        injection(7, ("flatten", "MODEL"), block_preset="flatten", attention_end=0.8),
        cfg_guider(7, ("injection", "MODEL")),
        *sample_and_save(9, ("guider", "GUIDER"), "TVE_flatten_edit"),
        *consistency(12),
    ],
    "tokenflow_flatten_edit.json": [
        start_note("FLATTEN + TokenFlow video edit", "Edits a clip with a prompt: FLATTEN's flow-guided attention "
                   "and TokenFlow's keyframes together.", video_steps(),
                   "The flow runs 'dis': nothing to download (RAFT: see Details)."),
        *checkpoint(),
        details_note(TOKENFLOW_FLATTEN_DETAILS),
        *source_frames(),
        *edit_prompts(),
        *flatten(3),
        *inversion(model=("flatten", "MODEL"), column=6),
        tokenflow(7, ("flatten", "MODEL")),
        cfg_guider(7, ("tokenflow", "MODEL")),
        *sample_and_save(9, ("guider", "GUIDER"), "TVE_tokenflow_flatten_edit"),
        *consistency(12),
    ],
    "ei2_one_shot_edit.json": [
        start_note("EI² one-shot edit", "Tunes the model on the clip, then edits the clip with a prompt.",
                   video_steps() + ["**Source prompt (describe the clip)**: the clip as it is"]),
        *checkpoint(),
        details_note(EI2_DETAILS),
        *source_frames(),
        *edit_prompts(),
        prompt("source_prompt", 2, "a video of shapes moving over a background",
               first(5, "Source prompt (describe the clip)")),
        Node("cross_frame", "TVE_ApplyCrossFrameAttention", 3,
             {"mode": "fine_coarse", "keyframe_interval": 8, "anchor_frame": 0, "anchor_include_self": False,
              "coarse_factor": 2, "seed": 0, "token_grids": "all", "start_percent": 0.0, "end_percent": 1.0},
             {"model": ("windows", "MODEL")}, group=TUNE),
        Node("tune", "TVE_OneShotTune", 4,
             {"steps": 300, "learning_rate": 3e-5, "seed": 0, "kind": "stam", "trainable": "temporal+queries",
              "gradient_checkpointing": True},
             {"model": ("cross_frame", "MODEL"), "latent": ("encode", "LATENT"),
              "conditioning": ("source_prompt", "CONDITIONING")}, group=TUNE),
        Node("save_adapter", "TVE_SaveTemporalAdapter", 4, {"filename_prefix": "tve_one_shot"},
             {"adapter": ("tune", "adapter")}, group=TUNE),
        Node("show_loss", "PreviewImage", 4, links={"images": ("tune", "loss_graph")}, title="Loss", group=TUNE),
        Node("inversion", "TVE_DDIMInversion", 5, {"steps": 50, "scheduler": "ddim_uniform"},
             {"model": ("tune", "model"), "latent": ("encode", "LATENT"),
              "conditioning": ("source_prompt", "CONDITIONING")}, group=INVERT),
        cfg_guider(6, ("tune", "model")),
        *sample_and_save(8, ("guider", "GUIDER"), "TVE_ei2_edit"),
    ],
    "text2video_zero.json": [
        start_note("Text2Video-Zero", "Makes a short video from a prompt with an image model (no source clip).",
                   [f"**Load Checkpoint**: your {SD15.name} checkpoint", "**Prompt**: the video, in words",
                    "**Size**: width and height", "**Frames and motion**: frames, motion_x/y per frame"]),
        *checkpoint(),
        details_note(T2V_ZERO_DETAILS),
        prompt("target_prompt", 1, "a horse galloping on a street, photorealistic", first(2, "Prompt"),
               group="Generate"),
        Node("size", "EmptyLatentImage", 1, {"width": 512, "height": 512, "batch_size": 1}, title=first(3, "Size"),
             group="Generate"),
        prompt("negative_prompt", 1, NEGATIVE_PROMPT, "Negative prompt", group="Generate"),
        Node("motion", "TVE_MotionDynamicsLatents", 2,
             {"seed": 0, "frames": 8, "motion_x": -1.5, "motion_y": -1.5, "steps": 50, "cfg": 7.5,
              "scheduler": "ddim_uniform", "t0": 44, "t1": 47},
             {"model": ("windows", "MODEL"), "positive": ("target_prompt", "CONDITIONING"),
              "negative": ("negative_prompt", "CONDITIONING"), "latent": ("size", "LATENT")},
             title=first(4, "Frames and motion"), group="Generate"),
        Node("cross_frame", "TVE_ApplyCrossFrameAttention", 3,
             {"mode": "anchor", "keyframe_interval": 8, "anchor_frame": 0, "anchor_include_self": False,
              "coarse_factor": 2, "seed": 0, "token_grids": "all", "start_percent": 0.0, "end_percent": 1.0},
             {"model": ("windows", "MODEL")}, group="Generate"),
        Node("guider", "CFGGuider", 4, {"cfg": 7.5},
             {"model": ("cross_frame", "MODEL"), "positive": ("target_prompt", "CONDITIONING"),
              "negative": ("negative_prompt", "CONDITIONING")}, group="Generate"),
        *sample_and_save(6, ("guider", "GUIDER"), "TVE_text2video_zero", sigmas=("motion", "sigmas"),
                         latent=("motion", "latent"), video=False, group="Generate"),
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
            "groups": _groups(spec, nodes), "config": {}, "extra": {"ds": VIEW}, "version": 0.4}


def _link(link_id: int, item: Node, entry: dict, slot: int, nodes: dict, ids: dict) -> list:
    """Connect ``item``'s input ``entry`` (at ``slot``) to the output its spec names; returns the link row."""
    source_name, output_name = item.links[entry["name"]]
    source = nodes.get(source_name)
    if source is None or source["type"] == NOTE_TYPE:
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
    title = {"title": note.title} if note.title else {}
    return {"type": NOTE_TYPE, "flags": {}, "mode": 0, "inputs": [], "outputs": [], **title, "properties": {},
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
    if node["type"] == NOTE_TYPE:                   # rendered Markdown: wrapped lines, headings a line more
        lines = sum(0.5 if not line.strip() else
                    math.ceil(len(line.replace("**", "")) / NOTE_CHARS_PER_LINE) + 0.8 * line.startswith("#")
                    for line in node["widgets_values"][0].splitlines())
        return math.ceil(lines * NOTE_LINE_HEIGHT) + NOTE_PADDING
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
        y = next_y.get(item.column, TOP)
        node["pos"] = [item.column * COLUMN_WIDTH, y]
        next_y[item.column] = y + TITLE_HEIGHT + node["size"][1] + ROW_GAP


def _frame(node: dict) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a laid-out node, its title bar included."""
    (x, y), (w, h) = node["pos"], node["size"]
    return x, y - TITLE_HEIGHT, x + w, y + h


def _groups(spec: list[Node | Note], nodes: dict[str, dict]) -> list[dict]:
    """One UI group (the frontend's titled frame) per ``group`` name, in order of first use, around its nodes.
    Frames must not overlap each other or a node of another group: the frontend moves what a frame holds. The e2e
    suite checks that every shipped node sits in a group."""
    members: dict[str, list[dict]] = {}
    for item in spec:
        if item.group is not None:
            members.setdefault(item.group, []).append(nodes[item.name])
    groups, frames = [], {}
    for i, (title, grouped) in enumerate(members.items(), start=1):
        x0, y0, x1, y1 = (f([_frame(n)[k] for n in grouped]) for k, f in enumerate((min, min, max, max)))
        frames[title] = (x0 - GROUP_PADDING, y0 - GROUP_PADDING - GROUP_TITLE_HEIGHT, x1 + GROUP_PADDING,
                         y1 + GROUP_PADDING)
        bx0, by0, bx1, by1 = frames[title]
        groups.append({"id": i, "title": title, "bounding": [bx0, by0, bx1 - bx0, by1 - by0], "color": GROUP_COLOR,
                       "font_size": GROUP_FONT_SIZE, "flags": {}})
    for item in spec:
        for title, (gx0, gy0, gx1, gy1) in frames.items():
            x0, y0, x1, y1 = _frame(nodes[item.name])
            if item.group not in (None, title) and x0 < gx1 and gx0 < x1 and y0 < gy1 and gy0 < y1:
                raise ValueError(f"{item.name} (group '{item.group}') overlaps group '{title}'; give each group "
                                 "columns of its own")
    placed = list(frames.items())
    for i, (a, (ax0, ay0, ax1, ay1)) in enumerate(placed):
        for b, (bx0, by0, bx1, by1) in placed[i + 1:]:
            if ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1:
                raise ValueError(f"groups '{a}' and '{b}' overlap; give each group columns of its own")
    return groups


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


FORM_KEYS = ("input", "input_order", "output", "output_name", "output_node")   # what decides a node's form in a file


def form(info: Mapping) -> dict:
    """The part of a node's /object_info entry that decides how a file holds the node: not the choices of its combos
    (a file names one; which files a loader lists depends on the installation)."""
    def unchosen(spec: list) -> list:
        if isinstance(spec[0], list):
            return [[], *spec[1:]]
        if spec[0] == "COMBO" and "options" in input_options(spec):
            return [spec[0], {**spec[1], "options": []}, *spec[2:]]
        return list(spec)
    kept = {key: info[key] for key in FORM_KEYS if key in info}
    kept["input"] = {group: {name: unchosen(spec) for name, spec in inputs.items()}
                     for group, inputs in info["input"].items()}
    return kept


def core_types() -> set[str]:
    """The ComfyUI nodes the workflows use."""
    return {item.type for spec in WORKFLOWS.values() for item in spec
            if isinstance(item, Node) and not item.type.startswith("TVE_")}


def floor_nodes() -> dict:
    """The floor release's /object_info entries of :func:`core_types` (tools/floor_core_nodes.json)."""
    saved = json.loads(FLOOR_NODES.read_text(encoding="utf-8"))
    missing = core_types() - set(saved["nodes"])
    if saved["comfyui"] != FLOOR_VERSION or missing:
        raise SystemExit(f"{FLOOR_NODES.name} is for ComfyUI {saved['comfyui']} and lacks {sorted(missing)}: run "
                         f"`COMFYUI_PATH=<ComfyUI {FLOOR_VERSION}> python tools/build_workflows.py --save-floor`")
    return saved["nodes"]


def build_all(object_info: Mapping) -> dict[str, dict]:
    """Every workflow, the pack's nodes as ``object_info`` defines them, core nodes in the floor's form."""
    definitions = {**object_info, **floor_nodes()}
    return {name: build_workflow(spec, definitions) for name, spec in WORKFLOWS.items()}


def render(workflow: dict) -> str:
    """The file text: the key order the frontend uses, two-space indent, a final newline."""
    keys = ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "title", "properties",
            "widgets_values", "color", "bgcolor")
    nodes = [{k: node[k] for k in keys if k in node} for node in workflow["nodes"]]
    return json.dumps({**workflow, "nodes": nodes}, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------- node definitions
def object_info_from(source: str) -> tuple[dict, str | None]:
    """/object_info of a running ComfyUI (URL) or a saved response (file), and the ComfyUI version (a server's)."""
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source.rstrip("/") + "/object_info") as response:
            info = json.load(response)
        with urllib.request.urlopen(source.rstrip("/") + "/system_stats") as response:
            return info, json.load(response)["system"]["comfyui_version"]
    return json.loads(Path(source).read_text(encoding="utf-8")), None


def object_info_in_process(comfyui: Path, node_types: set[str]) -> dict:
    """Definitions of ``node_types`` from ComfyUI's nodes and this pack, imported here on the CPU (as the
    server's /object_info reports them)."""
    sys.path.insert(0, str(comfyui.resolve()))
    from comfy.cli_args import args
    args.cpu = True
    import asyncio

    import utils.install_util  # noqa: F401  ComfyUI's utils package, as main.py imports it before nodes.py
    import nodes                         # puts comfy/ (with a utils.py) first on sys.path
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


def version_in(comfyui: Path) -> str:
    """The release of the ComfyUI checkout ``comfyui`` (its comfyui_version.py)."""
    text = (comfyui / "comfyui_version.py").read_text(encoding="utf-8")
    return text.split("__version__ = ")[1].split()[0].strip("\"'")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--object-info", help="URL of a running ComfyUI with the pack, or a saved /object_info "
                                              "JSON file (default: import $COMFYUI_PATH in-process)")
    parser.add_argument("--save-floor", action="store_true",
                        help=f"rewrite {FLOOR_NODES.relative_to(ROOT)} from ComfyUI {FLOOR_VERSION}'s definitions")
    args = parser.parse_args()
    if args.object_info:
        object_info, version = object_info_from(args.object_info)
    elif os.environ.get("COMFYUI_PATH"):
        used = {item.type for spec in WORKFLOWS.values() for item in spec if isinstance(item, Node)}
        comfyui = Path(os.environ["COMFYUI_PATH"])
        object_info, version = object_info_in_process(comfyui, used), version_in(comfyui)
    else:
        parser.error("set COMFYUI_PATH to a ComfyUI checkout or pass --object-info")
    if args.save_floor:
        if version != FLOOR_VERSION:
            parser.error(f"--save-floor needs ComfyUI {FLOOR_VERSION} (the definitions are from {version})")
        nodes = {name: form(object_info[name]) for name in sorted(core_types())}
        FLOOR_NODES.write_text(json.dumps({"comfyui": version, "nodes": nodes}, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {FLOOR_NODES.relative_to(ROOT)}: {len(nodes)} core nodes of ComfyUI {version}")
    WORKFLOW_DIR.mkdir(exist_ok=True)
    for name, workflow in build_all(object_info).items():
        (WORKFLOW_DIR / name).write_text(render(workflow), encoding="utf-8")
        print(f"wrote workflows/{name}: {len(workflow['nodes'])} nodes, {len(workflow['links'])} links")


if __name__ == "__main__":
    main()
