"""The shipped workflows on a real headless ComfyUI: they name only nodes, inputs and link types the server has,
they are what tools/build_workflows.py writes, and each one runs to the end on each source clip, with the frames
its frame cap picks at the size its resize step and VAEEncode give, and the clip's fps and audio."""
from __future__ import annotations

import copy
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tve.tests.e2e.session_files import (CHECKPOINT, CONTROLNET, FRAMES, HEIGHT, LONG, PACK_FOLDER, PHONE,
                                         RAFT_PLACEHOLDER, SMALL, SOURCES, WEB, WIDTH, SourceVideo)
from tve.tests.e2e.ui_workflow import combo_choices, layout, problems, to_api

pytestmark = pytest.mark.real_host

WORKFLOW_DIR = Path(__file__).resolve().parents[2] / "workflows"
WORKFLOW_FILES = sorted(WORKFLOW_DIR.glob("*.json"))

# Set on every node of these types before queueing: the session's checkpoint and ControlNet, tiny step
# counts, a small resize target (not a multiple of 8 for 16:9, so VAEEncode and the TVE nodes crop). The clip
# (LoadVideo.file) is set per run. Frame caps stay as shipped. An override naming an input the node lacks fails
# the test (keeps this table honest).
RESIZE_TO = 96
TYPE_OVERRIDES = {
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
    "ControlNetLoader": {"control_net_name": CONTROLNET},
    "TVE_DDIMInversion": {"steps": 2},
    "TVE_OneShotTune": {"steps": 2},
    "TVE_MotionDynamicsLatents": {"steps": 6, "t0": 2, "t1": 4, "frames": FRAMES},
    "EmptyLatentImage": {"width": WIDTH, "height": HEIGHT, "batch_size": 1},
    "ImageScaleToMaxDimension": {"largest_size": RESIZE_TO},
}

# Output nodes (by workflow file and node title) that do not show one picture per frame: pictures for n frames.
PICTURES = {("optical_flow_preview.json", "Flow and occlusion"): lambda n: 2 * (n - 1),   # flows, then masks
            ("ei2_one_shot_edit.json", "Loss"): lambda n: 1}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def with_overrides(graph: dict, source: SourceVideo) -> dict:
    overrides = {**TYPE_OVERRIDES, "LoadVideo": {"file": source.file}}
    if source.cap is not None and any(node["class_type"] == "ImageFromBatch" for node in graph.values()):
        overrides["ImageFromBatch"] = {"length": source.cap}
    for node_id, node in graph.items():
        for name, value in overrides.get(node["class_type"], {}).items():
            assert name in node["inputs"], f"override {node['class_type']}.{name}: node {node_id} has no such input"
            node["inputs"][name] = value
    return graph


def expected_video(graph: dict, source: SourceVideo) -> tuple[int, tuple[int, int]]:
    """(frames, (height, width)) a workflow makes of ``source``: ImageFromBatch's range of the clip (as core
    clamps it), ImageScaleToMaxDimension's size, VAEEncode's crop to a multiple of 8. Text2Video-Zero: its own."""
    by_type = {node["class_type"]: node["inputs"] for node in graph.values()}
    if "LoadVideo" not in by_type:
        motion, size = by_type["TVE_MotionDynamicsLatents"], by_type["EmptyLatentImage"]
        return motion["frames"], (size["height"] // 8 * 8, size["width"] // 8 * 8)
    cap = by_type["ImageFromBatch"]
    start = min(source.frames - 1, cap["batch_index"])
    frames = min(source.frames - start, cap["length"])
    largest = by_type["ImageScaleToMaxDimension"]["largest_size"]
    long_side, short_side = max(source.height, source.width), min(source.height, source.width)
    short = round(short_side / long_side * largest)
    height, width = (short, largest) if source.width >= source.height else (largest, short)
    return frames, (height // 8 * 8, width // 8 * 8)


@dataclass(frozen=True)
class Output:
    frames: int
    size: tuple[int, int] | None          # (height, width) of a saved video
    fps: float | None
    audio: bool


def output_of(comfyui, result: dict) -> Output:
    """What an output node produced: its saved video's frames, size, frame rate and audio, or its images."""
    import av                                          # PyAV comes with ComfyUI, not with the pack's test extras
    files = result.get("images", [])
    if not any(result.get("animated", [])):
        return Output(len(files), None, None, False)
    assert len(files) == 1, f"expected one video file, got {files}"
    data = comfyui.get("/view", filename=files[0]["filename"], subfolder=files[0]["subfolder"],
                       type=files[0]["type"]).content
    with av.open(io.BytesIO(data)) as container:
        audio = any(stream.type == "audio" for stream in container.streams)
        fps = float(container.streams.video[0].average_rate)
        frames = [frame for frame in container.decode(video=0)]
    sizes = {(f.height, f.width) for f in frames}
    assert len(sizes) == 1, sizes
    return Output(len(frames), sizes.pop(), fps, audio)


def test_server_lists_every_pack_node_from_the_awkward_folder(object_info):
    from tve.nodes import NODE_CLASS_MAPPINGS
    listed = {name for name in object_info if name.startswith("TVE_")}
    assert listed == set(NODE_CLASS_MAPPINGS)
    assert {object_info[name]["python_module"] for name in listed} == {f"custom_nodes.{PACK_FOLDER}"}


def test_server_log_shows_the_pack_imported_without_errors(comfyui, object_info):
    lines = [line for line in comfyui.log.read_text(encoding="utf-8").splitlines() if PACK_FOLDER in line]
    failures = [line for line in lines if "IMPORT FAILED" in line or "Cannot import" in line]
    assert not failures, "\n".join(failures) + "\n" + comfyui.log_tail()
    assert any(re.search(r"seconds: .*" + re.escape(PACK_FOLDER), line) for line in lines), comfyui.log_tail()


def test_optical_flow_folder_from_extra_model_paths_is_offered(object_info):
    spec = object_info["TVE_OpticalFlow"]["input"]["required"]["raft_weights"]
    assert RAFT_PLACEHOLDER in combo_choices(spec)


def test_workflow_files_are_what_build_workflows_writes(comfyui, object_info):
    """The files are the tool's output for the pack's nodes as this server defines them and core nodes in the
    floor release's form (tools/floor_core_nodes.json); on the floor release, that snapshot is its definitions."""
    from tve.tools.build_workflows import FLOOR_VERSION, build_all, core_types, floor_nodes, form, render
    if comfyui.get("/system_stats").json()["system"]["comfyui_version"] == FLOOR_VERSION:
        assert floor_nodes() == {name: form(object_info[name]) for name in core_types()}, \
            "tools/floor_core_nodes.json is stale: run `COMFYUI_PATH=... python tools/build_workflows.py --save-floor`"
    expected = {name: render(workflow) for name, workflow in build_all(object_info).items()}
    on_disk = {path.name: path.read_text(encoding="utf-8") for path in WORKFLOW_FILES}
    assert sorted(on_disk) == sorted(expected), "workflows/ and the specs in tools/build_workflows.py differ"
    stale = [name for name in expected if on_disk[name] != expected[name]]
    assert not stale, f"{stale} are stale: run `COMFYUI_PATH=... python tools/build_workflows.py`"


def test_checker_reports_unknown_nodes_inputs_widgets_and_mistyped_links(object_info):
    workflow = load(WORKFLOW_DIR / "inversion_reconstruction.json")
    assert problems(workflow, object_info) == []
    mutations = {
        "node type is not in /object_info": lambda w, n: n["CreateVideo"].update(type="TVE_NoSuchNode"),
        "input 'latentx' does not exist": lambda w, n: n["TVE_DDIMInversion"]["inputs"][1].update(name="latentx"),
        # one value more than the node has widgets (a trailing optional widget may be left out: not a problem)
        "widget values for the node's": lambda w, n: n["TVE_DDIMInversion"]["widgets_values"].append(7),
        "is not a INT": lambda w, n: n["TVE_DDIMInversion"]["widgets_values"].__setitem__(0, "fifty"),
        "takes SIGMAS": lambda w, n: w["links"][[l[5] for l in w["links"]].index("SIGMAS")].__setitem__(5, "LATENT"),
        "required input 'vae' is not linked": lambda w, n: n["VAEDecode"]["inputs"][1].update(link=None),
    }
    for expected, mutate in mutations.items():
        broken = copy.deepcopy(workflow)
        mutate(broken, {node["type"]: node for node in broken["nodes"]})
        found = problems(broken, object_info)
        assert any(expected in p for p in found), (expected, found)
        with pytest.raises(ValueError):
            to_api(broken, object_info)


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_names_only_nodes_inputs_and_link_types_the_server_has(path, object_info):
    assert problems(load(path), object_info) == []


# Every workflow runs on the web clip; these also on the small 4:3 clip (shorter than the frame caps, upscaled: one
# graph of each kind of frame use) and on the phone-size one (the graph that failed on it before frames of any size).
OTHER_CLIP_RUNS = {SMALL: {"optical_flow_preview.json", "inversion_reconstruction.json", "flatten_edit.json"},
                   PHONE: {"flatten_edit.json"}, LONG: {"tokenflow_edit.json", "flatten_edit.json"}}


def runs() -> list:
    """Every workflow on the web clip; a few on the others too (keeps the suite within minutes on 2 cores)."""
    def name(path: Path, source: SourceVideo) -> str:
        reads_video = "LoadVideo" in path.read_text(encoding="utf-8")
        whole = f"-{source.frames}-frames" if source.cap else ""
        return f"{path.name}-{source.width}x{source.height}{whole}" if reads_video else path.name

    return [pytest.param(path, source, id=name(path, source)) for path in WORKFLOW_FILES for source in SOURCES
            if source is WEB or path.name in OTHER_CLIP_RUNS[source]]


@pytest.mark.parametrize("path, source", runs())
def test_workflow_runs_to_the_end_with_its_frame_count_at_its_size(path, source, comfyui, object_info):
    graph = with_overrides(to_api(load(path), object_info), source)
    assert_ran_to_the_end(comfyui, object_info, path, graph, comfyui.run(graph), source)


def assert_ran_to_the_end(comfyui, object_info: dict, path: Path, graph: dict, entry: dict,
                          source: SourceVideo) -> None:
    """``entry`` (the /history of ``graph``, workflow file ``path`` on ``source``) succeeded and every output node
    showed or saved what it should: the workflow's frame count at its size, with the clip's fps and audio."""
    status = entry["status"]
    errors = [message for message in status["messages"] if message[0] == "execution_error"]
    assert status["status_str"] == "success" and status["completed"], f"{errors}\n{comfyui.log_tail()}"
    output_nodes = {node_id: node["_meta"]["title"] for node_id, node in graph.items()
                    if object_info[node["class_type"]]["output_node"]}
    assert output_nodes, "a workflow must show or save something"
    assert set(entry["outputs"]) == set(output_nodes), f"outputs {sorted(entry['outputs'])} of {output_nodes}"
    frames, size = expected_video(graph, source)
    reads_video = any(node["class_type"] == "LoadVideo" for node in graph.values())
    for node_id, title in output_nodes.items():
        if graph[node_id]["class_type"] == "TVE_SaveTemporalAdapter":     # EI²: the adapter file it wrote
            (written,) = entry["outputs"][node_id]["text"]
            assert written.endswith(".safetensors") and Path(written).is_file(), written
            continue
        if "images" not in entry["outputs"][node_id]:       # Consistency: its summary, on the frames of the video
            (summary,) = entry["outputs"][node_id]["text"]
            assert "warp error" in summary and "source warp error" in summary, summary
            assert f", {frames} frames" in summary and f"x{size[0]}" in summary, summary
            continue
        made = output_of(comfyui, entry["outputs"][node_id])
        assert made.frames == PICTURES.get((path.name, title), lambda n: n)(frames), (title, made)
        if made.size is not None:
            assert made.size == size, (title, made)
            assert made.fps == (source.fps if reads_video else 8.0), (title, made)
            assert made.audio == (source.audio and reads_video), (title, made)


def inside(node: dict, bounding: list) -> bool:
    """The frontend's rule: a node (its title bar included) whose rectangle lies within a group's belongs to it."""
    (x, y), (w, h) = node["pos"], node["size"]
    gx, gy, gw, gh = bounding
    return gx <= x and gy <= y - 30 and x + w <= gx + gw and y + h <= gy + gh


NUMBERS = "①②③④⑤"


def is_numbered(node: dict) -> bool:
    """Whether the node is one the short Note says to set first (its title starts with its number)."""
    return node.get("title", "")[:1] in tuple(NUMBERS)


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_every_node_sits_in_one_group_and_the_short_note_names_the_nodes_to_set_first(path):
    """Every node in exactly one group; a short "Start here" Note names, in order, the numbered nodes to set first
    (checkpoint, clip, frames, prompt) by their titles; a "Details" Note gives the VRAM estimate, and in a video
    workflow what an empty frame range does."""
    workflow = load(path)
    titles = [group["title"] for group in workflow["groups"]]
    for node in workflow["nodes"]:
        holders = [g["title"] for g in workflow["groups"] if inside(node, g["bounding"])]
        assert len(holders) == 1, (node["type"], node.get("title"), holders)
    notes = {node.get("title"): node["widgets_values"][0] for node in workflow["nodes"]
             if node["type"] == "MarkdownNote"}
    assert sorted(notes) == ["Details", "Start here"], sorted(notes)
    start, details = notes["Start here"], notes["Details"]
    assert start.count("Set first") == 1 and len(start.splitlines()) <= 14, start
    numbered = sorted(node["title"] for node in workflow["nodes"] if is_numbered(node))
    assert [title[0] for title in numbered] == list(NUMBERS[:len(numbered)]) and len(numbered) >= 3, numbered
    named = [f"{title[0]} **{title[2:]}**" for title in numbered]
    assert [name for name in named if name not in start] == [], start
    assert [start.index(name) for name in named] == sorted(start.index(name) for name in named)
    assert "VRAM" in details and "estimate" in details
    types = {node["type"] for node in workflow["nodes"]}
    if "LoadVideo" in types:
        assert titles[0] == "Load" and [t[2:] for t in numbered[:3]] == [
            "Load Checkpoint", "Source video", "Frames (start, number)"]
        assert "no frames" in details and "before any TVE node" in details
    if "TVE_DDIMInversion" in types:
        # EI² tunes the model on the clip between loading and inverting it; the reconstruction has no edit prompt.
        expected = ["Load", "Invert", "Edit", "Save"]
        if "TVE_OneShotTune" in types:
            expected = ["Load", "Prompt", "Tune", "Invert", "Edit", "Save"]
        elif any("Target prompt" in title for title in numbered):
            expected = ["Load", "Prompt", "Invert", "Edit", "Save"]
        assert titles == expected
    if "TVE_OpticalFlow" in types:
        assert "models/optical_flow" in details and "raft_large_C_T_SKHT_V2-ff5fadd5.pth" in details


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_opens_on_settings_the_server_offers_but_the_files_to_set_first(path, object_info):
    """Every combo value of a shipped file is one the server offers (a new artist can queue it as it opens), except
    the files the artist picks first (numbered nodes) and model files the file says where to download (the editor's
    missing-model dialog offers them)."""
    missing = []
    for node in load(path)["nodes"]:
        if node["type"] not in object_info or is_numbered(node):
            continue
        downloads = {model["name"] for model in node["properties"].get("models", [])}
        slots, _ = layout(object_info[node["type"]], node["widgets_values"])
        for slot, value in zip(slots, node["widgets_values"]):
            if slot.name and slot.spec and combo_choices(slot.spec) and value not in combo_choices(slot.spec) \
                    and value not in downloads:
                missing.append(f"{node['type']}.{slot.name} = {value!r}")
    assert missing == [], "the server does not offer these: the first Queue fails validation"


@pytest.mark.parametrize("path", [p for p in WORKFLOW_FILES if "LoadVideo" in p.read_text(encoding="utf-8")],
                         ids=lambda p: p.name)
def test_video_workflows_cap_and_resize_the_frames_and_carry_fps_and_audio(path, object_info):
    graph = to_api(load(path), object_info)
    by_type = {node["class_type"]: (node_id, node["inputs"]) for node_id, node in graph.items()}
    components, _ = by_type["GetVideoComponents"]
    frames_id, frames = by_type["ImageFromBatch"]
    resize_id, resize = by_type["ImageScaleToMaxDimension"]
    assert frames["image"] == [components, 0] and resize["image"] == [frames_id, 0]
    assert by_type["VAEEncode"][1]["pixels"] == [resize_id, 0]
    assert resize["largest_size"] == (1024 if "sdxl" in path.name else 512)
    flows = [node["inputs"] for node in graph.values() if node["class_type"] == "TVE_OpticalFlow"]
    assert all(flow["images"] == [resize_id, 0] for flow in flows)
    if "CreateVideo" in by_type:
        video = by_type["CreateVideo"][1]
        assert video["fps"] == [components, 2] and video["audio"] == [components, 1]
