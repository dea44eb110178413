"""The optical-flow nodes on both hosts: weights from models/optical_flow, errors, progress, previews."""
import os

import pytest
import torch
import torchvision

from tve.engine import host
from tve.engine.optical_flow import NO_WEIGHTS
from tve.nodes.flow_nodes import FlowTrajectories, OpticalFlow, PreviewFlow, PreviewTrajectories
from tve.tests.hosts import REAL_HOST, make_vae
from tve.tools.video_world import frames_to_latent, render_clip


@pytest.fixture
def flow_folder(tmp_path):
    """A temporary models/optical_flow as the node sees it through folder_paths."""
    folder = tmp_path / "optical_flow"
    folder.mkdir()
    with host.model_folder_at(host.OPTICAL_FLOW_FOLDER, str(folder)):
        yield folder


VAE = make_vae()


def clip(frames=3, height=48, width=64):
    return render_clip(frames, height, width, seed=5, sprites=1)


def test_raft_weights_saved_into_models_optical_flow_load_and_run(flow_folder):
    torch.save(torchvision.models.optical_flow.raft_small(weights=None).state_dict(), flow_folder / "mine.pth")
    assert "mine.pth" in OpticalFlow.INPUT_TYPES()["required"]["raft_weights"][1]["options"]
    (flow,) = OpticalFlow.execute(clip().frames, VAE, "raft_small", "mine.pth", 2).result
    assert flow.forward.shape == flow.backward.shape == (2, 2, 48, 64)
    assert flow.occlusion.shape == (2, 48, 64) and flow.occlusion.dtype == torch.bool
    assert flow.method == "raft_small"


def test_missing_or_wrong_raft_weights_are_clear_errors(flow_folder):
    torch.save(torchvision.models.optical_flow.raft_small(weights=None).state_dict(), flow_folder / "small.pth")
    with pytest.raises(ValueError, match="raft_large_C_T_SKHT_V2-ff5fadd5.pth"):
        OpticalFlow.execute(clip().frames, VAE, "raft_large", NO_WEIGHTS, 2)
    with pytest.raises(ValueError, match="not found"):
        OpticalFlow.execute(clip().frames, VAE, "raft_large", "gone.pth", 2)
    with pytest.raises(ValueError, match="raft_large"):
        OpticalFlow.execute(clip().frames, VAE, "raft_large", "small.pth", 2)


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
            OpticalFlow.execute(clip().frames, VAE, "raft_large", name, 2)


def test_dis_needs_no_weights_and_reports_progress_per_pair():
    updates = []
    host.report_progress_to(lambda done, total: updates.append((done, total)))
    try:
        (flow,) = OpticalFlow.execute(clip(4).frames, VAE, "dis", NO_WEIGHTS, 8).result
    finally:
        host.report_progress_to(None)
    assert flow.frames == 4 and flow.method == "dis"
    if not REAL_HOST:                    # 0.33 throttles updates closer than 0.1 s: only the stand-in sees each
        assert updates[-3:] == [(1, 3), (2, 3), (3, 3)]


def test_cancel_stops_the_flow_node():
    host.interrupt()
    try:
        with pytest.raises(host.Interrupted):
            OpticalFlow.execute(clip(4).frames, VAE, "dis", NO_WEIGHTS, 1)
        assert not host.interrupt_requested()
    finally:
        host.interrupt(False)


def test_fewer_than_two_frames_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 frames"):
        OpticalFlow.execute(clip(1).frames, VAE, "dis", NO_WEIGHTS, 8)


def test_trajectories_refuse_a_latent_of_another_frame_count_or_aspect():
    video = clip(4, 64, 64)
    (flow,) = OpticalFlow.execute(video.frames, VAE, "dis", NO_WEIGHTS, 8).result
    latent = {"samples": frames_to_latent(video.frames)}
    (trajectories,) = FlowTrajectories.execute(flow, latent, 0, True).result
    assert trajectories.frames == 4 and sorted(trajectories.grids)[-1] == (8, 8)
    with pytest.raises(ValueError, match="frames"):
        FlowTrajectories.execute(flow, {"samples": latent["samples"][:3]}, 0, True)
    with pytest.raises(ValueError, match=r"latent: 12x8 .* flow's frames \(64x64\) encode to a 8x8 latent"):
        FlowTrajectories.execute(flow, {"samples": torch.zeros(4, 4, 8, 12)}, 0, True)


def shown_files(ui: dict) -> list:
    """The preview PNGs a node's ``ui.images`` names; on the real host each must exist in ComfyUI's temp folder."""
    files = ui["images"]
    if REAL_HOST:
        for entry in files:
            assert entry["type"] == "temp"
            assert os.path.isfile(host.preview_path(entry))
    return files


def test_previews_show_on_the_node_and_return_one_picture_per_pair_and_per_frame():
    video = clip(4, 64, 64)
    (flow,) = OpticalFlow.execute(video.frames, VAE, "dis", NO_WEIGHTS, 8).result
    shown = PreviewFlow.execute(flow)
    colours, occlusion = shown.result
    assert colours.shape == occlusion.shape == (3, 64, 64, 3)
    assert len(shown_files(shown.ui)) == 3 + 3                       # flow pictures, then occlusion masks
    (trajectories,) = FlowTrajectories.execute(flow, {"samples": frames_to_latent(video.frames)}, 0, True).result
    shown = PreviewTrajectories.execute(trajectories, video.frames, "latent", 16, 0)
    (tracks,) = shown.result
    assert tracks.shape == video.frames.shape and not torch.equal(tracks, video.frames)
    assert len(shown_files(shown.ui)) == 4
    (coarse,) = PreviewTrajectories.execute(trajectories, video.frames, "latent/8", 16, 0).result
    assert coarse.shape == video.frames.shape
    with pytest.raises(ValueError, match="images"):
        PreviewTrajectories.execute(trajectories, video.frames[:3], "latent", 16, 0)


# ------------------------------------------------------------------------------------------------ frames of any size
ODD = (3, 54, 90)            # frames, height, width: neither side a multiple of 8 (VAEEncode keeps 48x88)


def vae_encoded_pixels(images: torch.Tensor) -> torch.Tensor:
    """The pixels the host's VAEEncode encodes (its own crop; the stand-in mirrors it)."""
    return VAE.vae_encode_crop_pixels(images)


def test_flow_covers_exactly_the_pixels_vae_encode_encodes():
    video = clip(*ODD)
    (flow,) = OpticalFlow.execute(video.frames, VAE, "dis", NO_WEIGHTS, 8).result
    assert (flow.height, flow.width) == (48, 88) and flow.crop.latent_hw == (6, 11)
    (of_cropped,) = OpticalFlow.execute(vae_encoded_pixels(video.frames), VAE, "dis", NO_WEIGHTS, 8).result
    assert torch.equal(flow.forward, of_cropped.forward) and torch.equal(flow.occlusion, of_cropped.occlusion)


def test_trajectories_previews_and_metrics_line_up_with_the_latent_of_odd_sized_frames():
    from tve.nodes.measure_nodes import ConsistencyMetrics
    video = clip(*ODD)
    encoded = vae_encoded_pixels(video.frames)                        # what VAEEncode encodes / VAEDecode returns
    (flow,) = OpticalFlow.execute(video.frames, VAE, "dis", NO_WEIGHTS, 8).result
    latent = {"samples": frames_to_latent(encoded)}
    assert latent["samples"].shape[-2:] == (6, 11)
    (trajectories,) = FlowTrajectories.execute(flow, latent, 0, True).result
    assert max(trajectories.grids, key=lambda hw: hw[0] * hw[1]) == (6, 11)
    (from_source,) = PreviewTrajectories.execute(trajectories, video.frames, "latent", 16, 0).result
    (from_decoded,) = PreviewTrajectories.execute(trajectories, encoded, "latent", 16, 0).result
    assert from_source.shape == (3, 48, 88, 3) and torch.equal(from_source, from_decoded)
    edited = ConsistencyMetrics.execute(encoded.flip(-1), flow, video.frames).result
    source_only = ConsistencyMetrics.execute(encoded, flow).result
    assert edited[0] > 0 and f"{source_only[0]:.3f}" in edited[2]        # the source floor, from raw frames
    assert "90x54, cropped by the VAE to 88x48" in edited[2]


def test_frames_of_another_video_or_length_are_errors_naming_both_sockets():
    from tve.nodes.measure_nodes import ConsistencyMetrics
    video = clip(*ODD)
    (flow,) = OpticalFlow.execute(video.frames, VAE, "dis", NO_WEIGHTS, 8).result
    with pytest.raises(ValueError, match=r"latent: 12x6 .*90x54, cropped by the VAE to 88x48.* 11x6 latent"):
        FlowTrajectories.execute(flow, {"samples": torch.zeros(3, 4, 6, 12)}, 0, True)
    with pytest.raises(ValueError, match=r"images: 90x50 \(w x h\) frames, but the flow .*90x54 or 88x48"):
        ConsistencyMetrics.execute(video.frames[:, :50], flow)
    with pytest.raises(ValueError, match="source_images: has 2 frames but the flow spans 3"):
        ConsistencyMetrics.execute(video.frames, flow, video.frames[:2])
    (trajectories,) = FlowTrajectories.execute(flow, {"samples": torch.zeros(3, 4, 6, 11)}, 0, True).result
    with pytest.raises(ValueError, match="images: 96x54 .* trajectories"):
        PreviewTrajectories.execute(trajectories, torch.rand(3, 54, 96, 3), "latent", 16, 0)


@pytest.mark.parametrize("height, width", [(240, 426), (480, 854), (288, 512), (61, 77), (1080, 1920)])
def test_latent_crop_is_the_hosts_vae_encode_crop(height, width):
    from tve.flow.latent_crop import LatentCrop
    from tve.engine import host
    images = torch.rand(1, height, width, 3)
    crop = LatentCrop((height, width), host.vae_downscale_ratio(VAE))
    assert torch.equal(crop.crop_frames(images), VAE.vae_encode_crop_pixels(images))
    assert crop.latent_hw == (height // 8, width // 8)


def test_a_value_that_is_not_an_image_vae_is_refused():
    with pytest.raises(ValueError, match="vae: expected an image VAE"):
        OpticalFlow.execute(clip().frames, object(), "dis", NO_WEIGHTS, 8)


# ------------------------------------------------------------------------------------------------ lean RAFT
def test_raft_is_built_once_and_loaded_by_cores_model_management(flow_folder):
    from tve.engine import optical_flow as flow_nodes
    from tve.engine import host
    torch.save(torchvision.models.optical_flow.raft_small(weights=None).state_dict(), flow_folder / "mine.pth")
    flow_nodes._RAFT_CACHE.clear()
    OpticalFlow.execute(clip().frames, VAE, "raft_small", "mine.pth", 2, 512)
    (raft,) = flow_nodes._RAFT_CACHE.values()
    OpticalFlow.execute(clip().frames, VAE, "raft_small", "mine.pth", 2, 512)
    assert list(flow_nodes._RAFT_CACHE.values()) == [raft]                   # not rebuilt for the second run
    patcher = host.helper_model(raft)
    assert host.helper_model(raft) is patcher and host.helper_loaded(patcher)     # one ModelPatcher, core loads it
    assert next(raft.parameters()).device == host.torch_device()
    assert next(raft.parameters()).dtype == host.helper_dtype(host.torch_device())   # float32 on the CPU


def core_optical_flow(flow_folder, name: str):
    """What core's Load Optical Flow Model gives (0.33+: run the node itself on ``name``; older hosts have no such
    node, so the same value, a ModelPatcher around the RAFT, is built as core builds it)."""
    from tve.engine import host
    try:
        host.core_node_class("OpticalFlowLoader")
    except ValueError:
        state = torch.load(flow_folder / name)
        module = torchvision.models.optical_flow.raft_large(weights=None)
        module.load_state_dict(state)
        return host.helper_model(module.eval())
    (patcher,) = host.run_core_node("OpticalFlowLoader", model_name=name)
    return patcher


@pytest.mark.real_host
def test_a_raft_loaded_by_cores_optical_flow_loader_runs_instead_of_the_file(flow_folder):
    torch.save(torchvision.models.optical_flow.raft_large(weights=None).state_dict(), flow_folder / "large.pth")
    frames = clip().frames
    (from_file,) = OpticalFlow.execute(frames, VAE, "raft_large", "large.pth", 2, 512).result
    connected = core_optical_flow(flow_folder, "large.pth")
    (from_core,) = OpticalFlow.execute(frames, VAE, "raft_large", NO_WEIGHTS, 2, 512, optical_flow=connected).result
    assert torch.allclose(from_core.forward, from_file.forward, atol=1e-4)
    assert torch.equal(from_core.occlusion, from_file.occlusion)
    with pytest.raises(ValueError, match="method: 'dis' computes the flow with OpenCV, but a RAFT is connected"):
        OpticalFlow.execute(frames, VAE, "dis", NO_WEIGHTS, 2, 512, optical_flow=connected)


def test_an_optical_flow_model_that_is_not_raft_is_refused_naming_the_input():
    from tve.engine import host
    other = host.helper_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="optical_flow: expected a torchvision RAFT loaded by core's Load Optical "
                                         "Flow Model, got a Linear"):
        OpticalFlow.execute(clip().frames, VAE, "raft_large", NO_WEIGHTS, 2, 512, optical_flow=other)
    with pytest.raises(ValueError, match="optical_flow: expected a torchvision RAFT"):
        OpticalFlow.execute(clip().frames, VAE, "raft_large", NO_WEIGHTS, 2, 512, optical_flow="raft")


def test_helpers_run_in_float32_on_the_cpu_as_comfy_does():
    from tve.engine import host
    assert host.helper_dtype(torch.device("cpu")) == torch.float32               # comfy: no fp16 on the CPU


def test_the_motion_input_reaches_the_trajectories_cell_mean_by_default():
    """Every cell's pixels move one cell right but its top-left pixel stays: the cell mean (63/64 of a cell) links
    each cell to its right neighbour, the official top-left rule to itself."""
    from tve.flow.estimate import FlowField
    frames, h, w = 3, 4, 6
    forward = torch.zeros(frames - 1, 2, 8 * h, 8 * w)
    forward[:, 0] = 8.0
    forward[:, 0, ::8, ::8] = 0.0                                   # the top-left pixel of every cell
    flow = FlowField(forward, -forward, torch.zeros(frames - 1, 8 * h, 8 * w, dtype=torch.bool), "known motion")
    latent = {"samples": torch.zeros(frames, 4, h, w)}
    node = FlowTrajectories

    def next_cell(trajectories):
        grid = trajectories.at((h, w))
        return grid.tracks[grid.track_of[0, 2 * w + 1], 1].item()   # where cell (row 2, column 1) is in frame 1

    assert next_cell(node.execute(flow, latent, 0, False).result[0]) == 2 * w + 2             # default: cell_mean
    assert next_cell(node.execute(flow, latent, 0, False, "cell_mean").result[0]) == 2 * w + 2
    assert next_cell(node.execute(flow, latent, 0, False, "top_left").result[0]) == 2 * w + 1
    assert FlowTrajectories.INPUT_TYPES()["required"]["motion"][1]["default"] == "cell_mean"
    with pytest.raises(ValueError, match="motion"):
        node.execute(flow, latent, 0, False, "nearest")
