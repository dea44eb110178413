"""Temporal adapter files (models/tve_adapters, safetensors + metadata) and the loss graph, on both hosts."""
import os

import pytest
import safetensors.torch
import torch

from tve.attention.temporal import TemporalAttention
from tve.engine import host
from tve.engine.loss_graph import loss_graph
from tve.engine.temporal_adapter import TemporalAdapter, load_adapter, save_adapter


def adapter(kind="stam"):
    g = torch.Generator().manual_seed(0)
    blocks = {"input.1.0": (8, 2), "output.3.1": (16, 2)}
    temporal = {name: TemporalAttention(c, h, kind, g).state_dict() for name, (c, h) in blocks.items()}
    diffs = {"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": torch.randn(8, 8,
                                                                                                   generator=g)}
    return TemporalAdapter(kind, "SD15/EPS", blocks, temporal, diffs, "temporal+queries", 7, (0.5, 0.25))


@pytest.fixture
def adapter_folder(tmp_path, monkeypatch):
    import folder_paths
    monkeypatch.setitem(folder_paths.folder_names_and_paths, host.ADAPTER_FOLDER, ([str(tmp_path)], {".safetensors"}))
    return tmp_path


@pytest.mark.parametrize("kind", ["stam", "layernorm"])
def test_an_adapter_file_round_trips_every_tensor_and_its_configuration(tmp_path, kind):
    a = adapter(kind)
    path = str(tmp_path / "a.safetensors")
    save_adapter(a, path)
    b = load_adapter(path)
    assert (b.kind, b.family, b.blocks, b.trainable, b.steps, b.losses) == (kind, "SD15/EPS", a.blocks,
                                                                            "temporal+queries", 7, (0.5, 0.25))
    assert b.temporal.keys() == a.temporal.keys()
    for name in a.temporal:
        assert b.temporal[name].keys() == a.temporal[name].keys()
        assert all(torch.equal(b.temporal[name][k], v) for k, v in a.temporal[name].items())
    assert all(torch.equal(b.query_diffs[k], v) for k, v in a.query_diffs.items())
    modules = b.modules()
    assert set(modules) == set(a.blocks) and modules["output.3.1"].channels == 16


def test_a_safetensors_file_that_is_not_an_adapter_is_a_clear_error(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    safetensors.torch.save_file({"lora_up.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="adapter_name: .* is not a TVE temporal adapter"):
        load_adapter(path)


def test_new_adapter_paths_count_up_inside_the_folder_and_never_leave_it(adapter_folder):
    first = host.new_adapter_path("clips/dog")
    assert first == os.path.join(str(adapter_folder), "clips", "dog_00001.safetensors")
    save_adapter(adapter(), first)
    assert host.new_adapter_path("clips/dog").endswith("dog_00002.safetensors")
    assert host.adapter_files() == [os.path.join("clips", "dog_00001.safetensors")]
    assert host.adapter_path(host.adapter_files()[0]) == first
    with pytest.raises(ValueError, match="filename_prefix: '../outside' leaves the tve_adapters folder"):
        host.new_adapter_path("../outside")
    with pytest.raises(ValueError, match="adapter_name: 'missing.safetensors' was not found"):
        host.adapter_path("missing.safetensors")


def test_adapter_folder_keeps_paths_from_extra_model_paths():
    import folder_paths
    folder_paths.folder_names_and_paths[host.ADAPTER_FOLDER] = (["/artist/adapters"], set())
    host.register_adapter_folder()
    paths = folder_paths.get_folder_paths(host.ADAPTER_FOLDER)
    assert paths == [os.path.join(folder_paths.models_dir, host.ADAPTER_FOLDER), "/artist/adapters"]
    host.register_adapter_folder()
    assert folder_paths.get_folder_paths(host.ADAPTER_FOLDER) == paths


def test_loss_graph_is_an_image_with_the_curve_drawn_and_bad_losses_are_refused():
    graph = loss_graph([1.0, 0.5, 0.4, 0.2, 0.21, 0.1], "loss")
    assert graph.shape == (1, 256, 512, 3) and graph.dtype == torch.float32
    assert 0.0 <= float(graph.min()) and float(graph.max()) <= 1.0
    blue = (graph[0, :, :, 2] > 0.7) & (graph[0, :, :, 0] < 0.4)
    red = (graph[0, :, :, 0] > 0.7) & (graph[0, :, :, 2] < 0.3)
    assert blue.sum() > 50 and red.sum() > 50
    assert loss_graph([0.3], "one step").shape == graph.shape
    with pytest.raises(ValueError, match="losses"):
        loss_graph([], "none")
    with pytest.raises(ValueError, match="losses"):
        loss_graph([0.1, float("nan")], "nan")
