"""The optical-flow nodes on both hosts: weights from models/optical_flow, errors, progress, previews."""
import os

import pytest
import torch
import torchvision

from tve.nodes.flow_nodes import NO_WEIGHTS, FlowTrajectories, OpticalFlow, PreviewFlow, PreviewTrajectories
from tve.tests.hosts import REAL_HOST
from tve.tools.video_world import frames_to_latent, render_clip


@pytest.fixture
def flow_folder(tmp_path, monkeypatch):
    """A temporary models/optical_flow as the node sees it through folder_paths."""
    import folder_paths
    folder = tmp_path / "optical_flow"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "optical_flow",
                        ([str(folder)], set(folder_paths.supported_pt_extensions)))
    if hasattr(folder_paths, "filename_list_cache"):
        monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    return folder


def clip(frames=3, height=48, width=64):
    return render_clip(frames, height, width, seed=5, sprites=1)


def test_raft_weights_saved_into_models_optical_flow_load_and_run(flow_folder):
    torch.save(torchvision.models.optical_flow.raft_small(weights=None).state_dict(), flow_folder / "mine.pth")
    assert "mine.pth" in OpticalFlow.INPUT_TYPES()["required"]["raft_weights"][0]
    (flow,) = OpticalFlow().estimate(clip().frames, "raft_small", "mine.pth", 2)
    assert flow.forward.shape == flow.backward.shape == (2, 2, 48, 64)
    assert flow.occlusion.shape == (2, 48, 64) and flow.occlusion.dtype == torch.bool
    assert flow.method == "raft_small"


def test_missing_or_wrong_raft_weights_are_clear_errors(flow_folder):
    torch.save(torchvision.models.optical_flow.raft_small(weights=None).state_dict(), flow_folder / "small.pth")
    with pytest.raises(ValueError, match="raft_large_C_T_SKHT_V2-ff5fadd5.pth"):
        OpticalFlow().estimate(clip().frames, "raft_large", NO_WEIGHTS, 2)
    with pytest.raises(ValueError, match="not found"):
        OpticalFlow().estimate(clip().frames, "raft_large", "gone.pth", 2)
    with pytest.raises(ValueError, match="raft_large"):
        OpticalFlow().estimate(clip().frames, "raft_large", "small.pth", 2)


class NotWeights:
    """A pickled Python object: what a safe loader must refuse to run."""


def test_empty_pickled_or_damaged_raft_files_are_one_error_saying_what_the_file_is(flow_folder):
    (flow_folder / "empty.pth").write_bytes(b"")
    torch.save({"model": NotWeights()}, flow_folder / "pickled.pth")
    (flow_folder / "damaged.pth").write_bytes(b"PK\x03\x04 not really a zip")
    expected = {"empty.pth": r"is an empty file \(0 bytes\), not a RAFT checkpoint",
                "pickled.pth": "holds pickled Python objects besides tensors, which TVE will not load",
                "damaged.pth": "could not be read as a checkpoint .* damaged or not a RAFT checkpoint"}
    for name, message in expected.items():
        with pytest.raises(ValueError, match=f"^raft_weights: '{name}' {message}"):
            OpticalFlow().estimate(clip().frames, "raft_large", name, 2)


def test_dis_needs_no_weights_and_reports_progress_per_flow():
    updates = []
    if not REAL_HOST:
        import comfy.utils
        comfy.utils.updates.clear()
        updates = comfy.utils.updates
    (flow,) = OpticalFlow().estimate(clip(4).frames, "dis", NO_WEIGHTS, 8)
    assert flow.frames == 4 and flow.method == "dis"
    if not REAL_HOST:
        assert updates[-1] == (6, 6)


@pytest.mark.skipif(REAL_HOST, reason="sets the stand-in's interrupt flag")
def test_cancel_stops_the_flow_node():
    import comfy.model_management as mm
    mm.interrupt_processing = True
    with pytest.raises(mm.InterruptProcessingException):
        OpticalFlow().estimate(clip(4).frames, "dis", NO_WEIGHTS, 1)
    assert not mm.interrupt_processing


def test_fewer_than_two_frames_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 frames"):
        OpticalFlow().estimate(clip(1).frames, "dis", NO_WEIGHTS, 8)


def test_trajectories_refuse_a_latent_of_another_frame_count_or_aspect():
    video = clip(4, 64, 64)
    (flow,) = OpticalFlow().estimate(video.frames, "dis", NO_WEIGHTS, 8)
    latent = {"samples": frames_to_latent(video.frames)}
    (trajectories,) = FlowTrajectories().build(flow, latent, 0, True)
    assert trajectories.frames == 4 and sorted(trajectories.grids)[-1] == (8, 8)
    with pytest.raises(ValueError, match="frames"):
        FlowTrajectories().build(flow, {"samples": latent["samples"][:3]}, 0, True)
    with pytest.raises(ValueError, match="aspect ratio"):
        FlowTrajectories().build(flow, {"samples": torch.zeros(4, 4, 8, 12)}, 0, True)


def shown_files(ui: dict) -> list:
    """The preview PNGs a node's ``ui.images`` names; on the real host each must exist in ComfyUI's temp folder."""
    files = ui["images"]
    if REAL_HOST:
        import folder_paths
        for entry in files:
            assert entry["type"] == "temp"
            assert os.path.isfile(os.path.join(folder_paths.get_temp_directory(), entry["subfolder"], entry["filename"]))
    return files


def test_previews_show_on_the_node_and_return_one_picture_per_pair_and_per_frame():
    video = clip(4, 64, 64)
    (flow,) = OpticalFlow().estimate(video.frames, "dis", NO_WEIGHTS, 8)
    shown = PreviewFlow().preview(flow)
    colours, occlusion = shown["result"]
    assert colours.shape == occlusion.shape == (3, 64, 64, 3)
    assert len(shown_files(shown["ui"])) == 3 + 3                       # flow pictures, then occlusion masks
    (trajectories,) = FlowTrajectories().build(flow, {"samples": frames_to_latent(video.frames)}, 0, True)
    shown = PreviewTrajectories().preview(trajectories, video.frames, "latent", 16, 0)
    (tracks,) = shown["result"]
    assert tracks.shape == video.frames.shape and not torch.equal(tracks, video.frames)
    assert len(shown_files(shown["ui"])) == 4
    (coarse,) = PreviewTrajectories().preview(trajectories, video.frames, "latent/8", 16, 0)["result"]
    assert coarse.shape == video.frames.shape
    with pytest.raises(ValueError, match="images"):
        PreviewTrajectories().preview(trajectories, video.frames[:3], "latent", 16, 0)
