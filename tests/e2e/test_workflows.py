"""The shipped workflows on a real headless ComfyUI: they name only nodes, inputs and link types the server has,
they are what tools/build_workflows.py writes, and each one runs to the end with the right number of frames."""
from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path

import pytest

from tve.tests.e2e.session_files import CHECKPOINT, FRAMES, HEIGHT, PACK_FOLDER, RAFT_PLACEHOLDER, VIDEO, WIDTH
from tve.tests.e2e.ui_workflow import combo_choices, problems, to_api

pytestmark = pytest.mark.real_host

WORKFLOW_DIR = Path(__file__).resolve().parents[2] / "workflows"
WORKFLOW_FILES = sorted(WORKFLOW_DIR.glob("*.json"))
RUN_TIMEOUT_S = 600

# Set on every node of these types before queueing: the session's own files, the CPU flow method, tiny step
# counts. An override naming an input the node lacks fails the test (keeps this table honest).
TYPE_OVERRIDES = {
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
    "LoadVideo": {"file": VIDEO},
    "TVE_OpticalFlow": {"method": "dis", "raft_weights": "none (method dis)"},
    "TVE_DDIMInversion": {"steps": 2},
    "TVE_OneShotTune": {"steps": 2},
    "TVE_MotionDynamicsLatents": {"steps": 6, "t0": 2, "t1": 4, "frames": FRAMES},
    "EmptyLatentImage": {"width": WIDTH, "height": HEIGHT, "batch_size": 1},
}

# Output nodes (by workflow file and node title) that do not show one image per source frame.
FRAME_COUNTS = {
    ("optical_flow_preview.json", "Flow and occlusion"): 2 * (FRAMES - 1),       # flow pictures, then masks
    ("ei2_one_shot_edit.json", "Loss"): 1,
}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def with_overrides(graph: dict) -> dict:
    for node_id, node in graph.items():
        for name, value in TYPE_OVERRIDES.get(node["class_type"], {}).items():
            assert name in node["inputs"], f"override {node['class_type']}.{name}: node {node_id} has no such input"
            node["inputs"][name] = value
    return graph


def frames_in(comfyui, result: dict) -> int:
    """Frames an output node produced: frames of its saved video, or its number of images."""
    import av                                          # PyAV comes with ComfyUI, not with the pack's test extras
    files = result.get("images", [])
    if not any(result.get("animated", [])):
        return len(files)
    assert len(files) == 1, f"expected one video file, got {files}"
    data = comfyui.get("/view", filename=files[0]["filename"], subfolder=files[0]["subfolder"],
                       type=files[0]["type"]).content
    with av.open(io.BytesIO(data)) as container:
        frames = [frame for frame in container.decode(video=0)]
    assert {(f.height, f.width) for f in frames} == {(HEIGHT, WIDTH)}
    return len(frames)


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


def test_workflow_files_are_what_build_workflows_writes(object_info):
    from tve.tools.build_workflows import build_all, render
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
        "widget values": lambda w, n: n["TVE_DDIMInversion"]["widgets_values"].pop(),
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


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_runs_to_the_end_with_the_right_number_of_frames(path, comfyui, object_info):
    workflow = load(path)
    graph = with_overrides(to_api(workflow, object_info))
    entry = comfyui.run(graph, RUN_TIMEOUT_S)
    status = entry["status"]
    errors = [message for message in status["messages"] if message[0] == "execution_error"]
    assert status["status_str"] == "success" and status["completed"], f"{errors}\n{comfyui.log_tail()}"
    output_nodes = {node_id: node["_meta"]["title"] for node_id, node in graph.items()
                    if object_info[node["class_type"]]["output_node"]}
    assert output_nodes, "a workflow must show or save something"
    assert set(entry["outputs"]) == set(output_nodes), f"outputs {sorted(entry['outputs'])} of {output_nodes}"
    counts = {title: frames_in(comfyui, entry["outputs"][node_id]) for node_id, title in output_nodes.items()
              if "images" in entry["outputs"][node_id]}
    expected = {title: FRAME_COUNTS.get((path.name, title), FRAMES) for title in counts}
    assert counts == expected
