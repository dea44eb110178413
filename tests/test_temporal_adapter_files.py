"""Temporal adapter files (models/tve_adapters, safetensors + metadata) and the loss graph, on both hosts: every way
a file can be damaged, foreign or inconsistent is one error naming adapter_name, the file and what was expected."""
import os
import pickle
import re

import pytest
import safetensors.torch
import torch

from tve.attention.temporal import TemporalAttention
from tve.engine import host
from tve.engine.loss_graph import loss_graph
from tve.engine.temporal_adapter import TemporalAdapter, load_adapter, save_adapter


QUERY_KEYS = {"input.1.0": "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn{}.to_q.weight",
              "output.3.1": "diffusion_model.output_blocks.3.1.transformer_blocks.1.attn{}.to_q.weight"}


def identity(seed=0):
    g = torch.Generator().manual_seed(seed)
    return host.WeightsFingerprint(layout="a" * 64, base=torch.randn(40, generator=g), patches="b" * 64,
                                   patch_values=torch.randn(6, generator=g), summary="5 UNet weights")


def adapter(kind="stam"):
    g = torch.Generator().manual_seed(0)
    blocks = {"input.1.0": (8, 2), "output.3.1": (16, 2)}
    temporal = {name: TemporalAttention(c, h, kind, g).state_dict() for name, (c, h) in blocks.items()}
    diffs = {QUERY_KEYS[name].format(i): torch.randn(c, c, generator=g) for name, (c, _) in blocks.items()
             for i in (1, 2)}
    return TemporalAdapter(kind, "SD15/EPS", blocks, temporal, diffs, "temporal+queries", 7, (0.5, 0.25),
                           identity=identity())


@pytest.fixture
def adapter_folder(tmp_path):
    with host.model_folder_at(host.ADAPTER_FOLDER, str(tmp_path)):
        yield tmp_path


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
    assert (b.identity.layout, b.identity.patches, b.identity.summary) == ("a" * 64, "b" * 64, "5 UNet weights")
    assert torch.equal(b.identity.base, a.identity.base) and torch.equal(b.identity.patch_values,
                                                                         a.identity.patch_values)
    assert b.source == path
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
    with host.model_folder_at(host.ADAPTER_FOLDER, "/artist/adapters"):       # what extra_model_paths.yaml made
        host.register_adapter_folder()
        paths = host.adapter_folders()
        assert paths == [host.default_model_folder(host.ADAPTER_FOLDER), "/artist/adapters"]
        host.register_adapter_folder()
        assert host.adapter_folders() == paths


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


# ---------------------------------------------------------------------------------------------- damaged and foreign files
@pytest.mark.parametrize("kind", ["stam", "layernorm"])
def test_the_expected_state_shapes_are_those_of_a_real_module(kind):
    module = TemporalAttention(24, 3, kind)
    assert TemporalAttention.state_shapes(24, kind) == {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _contents(a=None):
    """(metadata, tensors) of a good adapter file."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "good.safetensors")
        save_adapter(a or adapter(), path)
        with safetensors.safe_open(path, framework="pt") as f:
            return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _good_bytes() -> bytes:
    metadata, tensors = _contents()
    return safetensors.torch.save(tensors, metadata=metadata)


def _edit(metadata=None, drop=(), **tensors):
    """A file edit: metadata fields set (None: removed), tensors dropped or set."""
    def apply(meta, ts):
        for key, value in (metadata or {}).items():
            if value is None:
                meta.pop(key, None)
            else:
                meta[key] = value
        for key in drop:
            del ts[key]
        ts.update({k.replace("__", "."): v for k, v in tensors.items()})
    return apply


def _tensor(key, fn):
    def apply(meta, ts):
        ts[key] = fn(ts[key])
    return apply


def _nan_at(t, value=float("nan")):
    t = t.clone()
    t.reshape(-1)[0] = value
    return t


Q1 = "query." + QUERY_KEYS["input.1.0"].format(1)
B = "temporal.input.1.0"
FIELDS = ["format", "kind", "family", "trainable", "steps", "losses", "blocks", "identity"]

# (case, damage: bytes -> bytes or an edit of (metadata, tensors), what the error must say after "adapter_name: <path>")
DAMAGES = [
    # the file itself
    ("empty", lambda b: b"", r" is an empty file \(0 bytes\); expected a TVE temporal adapter"),
    ("half_its_bytes", lambda b: b[:len(b) // 2], r" is truncated: \d+ bytes, but its header (alone says|describes) \d+"),
    ("last_byte_cut", lambda b: b[:-1], r" is truncated: \d+ bytes, but its header describes \d+"),
    ("bytes_appended", lambda b: b + b"junk", r" is damaged: 4 bytes follow its last tensor"),
    ("shorter_than_a_header", lambda b: b"abc", r" is 3 bytes long, shorter than a safetensors header"),
    ("torch_zip_renamed", "torch_zip", r" is a PyTorch zip checkpoint \(torch.save\), not a safetensors file"),
    ("pickle_renamed", lambda b: pickle.dumps({"q": [1.0, 2.0]}, protocol=2),
     r" is a Python pickle .*, not a safetensors file"),
    ("text_file", lambda b: b"hello, this is a text file and no tensors\n",
     r" is not a safetensors file \(its first 8 bytes are no header length\)"),
    ("header_not_json", lambda b: (20).to_bytes(8, "little") + b"{not json at all!!!}",
     r" is not a safetensors file \(its header is not safetensors JSON\)"),
    # what the file is
    ("a_lora", lambda b: safetensors.torch.save({"lora_up.weight": torch.zeros(2, 2)}),
     r" is not a TVE temporal adapter \(no 'tve_temporal_adapter/2' metadata"),
    ("no_format", _edit({"format": None}), r" is not a TVE temporal adapter"),
    ("future_format", _edit({"format": "tve_temporal_adapter/9"}),
     r" is in format 'tve_temporal_adapter/9', which this TVE does not read; expected tve_temporal_adapter/2"),
    # every metadata field: missing, ill-typed, out of range
    *[(f"no_{field}", _edit({field: None}), rf": its metadata has no '{field}'; expected ")
      for field in FIELDS[1:]],
    ("kind_unknown", _edit({"kind": "spatial"}), r": its metadata 'kind' is 'spatial'; expected one of \['stam', "),
    ("family_empty", _edit({"family": ""}), r": its metadata 'family' is ''; expected a model family"),
    ("family_without_type", _edit({"family": "SD15"}), r": its metadata 'family' is 'SD15'; expected a model family"),
    ("trainable_unknown", _edit({"trainable": "everything"}), r": its metadata 'trainable' is 'everything'; expected one"),
    ("steps_not_a_number", _edit({"steps": "x"}), r": its metadata 'steps' is 'x'; expected a whole number"),
    ("steps_negative", _edit({"steps": "-3"}), r": its metadata 'steps' is '-3'; expected a whole number"),
    ("steps_fraction", _edit({"steps": "1.5"}), r": its metadata 'steps' is '1.5'; expected a whole number"),
    ("losses_not_json", _edit({"losses": "[0.5, "}), r": its metadata 'losses' is .*; expected a JSON list of finite "
                                                        r"numbers \(it is not valid JSON\)"),
    ("losses_nan", _edit({"losses": "[0.5, NaN]"}), r": its metadata 'losses' is .*; expected a JSON list of finite"),
    ("losses_not_a_list", _edit({"losses": '{"a": 1}'}), r": its metadata 'losses' is .*; expected a JSON list"),
    ("losses_of_text", _edit({"losses": '["low"]'}), r": its metadata 'losses' is .*; expected a JSON list"),
    ("blocks_not_json", _edit({"blocks": '{"input.1.0": [8, 2'}), r": its metadata 'blocks' is .*\(it is not valid JSON\)"),
    ("blocks_a_list", _edit({"blocks": "[[8, 2]]"}), r": its metadata 'blocks' is .*; expected a JSON object"),
    ("blocks_empty", _edit({"blocks": "{}"}), r": its metadata 'blocks' is '\{\}'; expected a JSON object"),
    ("block_name_foreign", _edit({"blocks": '{"down.1.0": [8, 2], "output.3.1": [16, 2]}'}),
     r": its metadata 'blocks' names a block 'down.1.0'; expected transformer block names"),
    ("block_entry_short", _edit({"blocks": '{"input.1.0": [8], "output.3.1": [16, 2]}'}),
     r": its metadata 'blocks' gives block input.1.0 \[8\]; expected \[channels, heads\]"),
    ("block_heads_not_dividing", _edit({"blocks": '{"input.1.0": [8, 3], "output.3.1": [16, 2]}'}),
     r"gives block input.1.0 \[8, 3\]; expected \[channels, heads\]: positive whole numbers, the channels a multiple"),
    ("block_zero_channels", _edit({"blocks": '{"input.1.0": [0, 2], "output.3.1": [16, 2]}'}),
     r"gives block input.1.0 \[0, 2\]; expected \[channels, heads\]"),
    ("block_float_channels", _edit({"blocks": '{"input.1.0": [8.0, 2], "output.3.1": [16, 2]}'}),
     r"gives block input.1.0 \[8.0, 2\]; expected \[channels, heads\]"),
    ("block_channels_unlike_its_tensors", _edit({"blocks": '{"input.1.0": [16, 2], "output.3.1": [16, 2]}'}),
     r": its tensor 'temporal.input.1.0.\w+' has shape \(8(, 8)?,?\); expected \(16(, 16)?,?\) \(a 'stam' temporal"),
    ("block_unlisted", _edit({"blocks": '{"output.3.1": [16, 2]}'}),
     r": holds 'temporal.input.1.0.\w+' for a block 'input.1.0' its 'blocks' metadata does not list \(it lists "
     r"output.3.1\)"),
    ("block_without_tensors", _edit({"blocks": '{"input.1.0": [8, 2], "output.3.1": [16, 2], "middle.0.0": [8, 2]}'}),
     r": lacks temporal.middle.0.0.gain, temporal.middle.0.0.k, temporal.middle.0.0.out …; a 'stam' temporal "
     r"attention of block middle.0.0 needs"),
    ("identity_not_json", _edit({"identity": "{"}), r": its metadata 'identity' is '\{'; expected a JSON object"),
    ("identity_fields_missing", _edit({"identity": '{"layout": "x"}'}), r": its metadata 'identity' is .*; expected a"),
    ("identity_digest_not_hex", _edit({"identity": '{"layout": "zz", "patches": "zz", "summary": ""}'}),
     r": its metadata 'identity' is .*; expected a JSON object"),
    # tensor names: unknown, missing, extra
    ("tensor_unknown", _edit(lora_up__weight=torch.zeros(2, 2)),
     r": holds a tensor 'lora_up.weight' that is not part of a temporal adapter; expected only tensors named "
     r"temporal.…, query.…, identity.…"),
    ("tensor_without_parameter", _edit(temporal__input__1__0=torch.zeros(8)),
     r": holds 'temporal.input.1.0' for a block 'input.1' its 'blocks' metadata does not list"),
    ("parameter_unknown", _edit(temporal__input__1__0__bogus=torch.zeros(8)),
     r": holds 'temporal.input.1.0.bogus', a parameter a 'stam' temporal attention does not have; expected \["),
    ("parameter_of_the_other_kind", _edit(temporal__input__1__0__norm_weight=torch.ones(8)),
     r": holds 'temporal.input.1.0.norm_weight', a parameter a 'stam' temporal attention does not have"),
    ("parameter_missing", _edit(drop=[f"{B}.gain"]),
     r": lacks temporal.input.1.0.gain; a 'stam' temporal attention of block input.1.0 needs \["),
    ("query_missing", _edit(drop=[Q1]),
     r": holds 3 query deltas; a 'temporal\+queries' adapter of 2 blocks has 4 \(attn1 and attn2 of each\)"),
    ("query_of_another_projection", _edit(**{"query__diffusion_model__x__attn1__to_k__weight": torch.zeros(8, 8)}),
     r": holds 'query.diffusion_model.x.attn1.to_k.weight', which is not a query projection weight"),
    ("queries_in_a_temporal_only_file", _edit({"trainable": "temporal"}),
     r": is marked trainable 'temporal' but holds 4 query deltas; expected none"),
    ("identity_tensor_missing", _edit(drop=["identity.base"]),
     r": lacks the tensor 'identity.base'; a tve_temporal_adapter/2 adapter records the weights it was tuned on"),
    ("identity_tensor_extra", _edit(identity__extra=torch.zeros(3)),
     r": holds a tensor 'identity.extra' that is not part of a temporal adapter"),
    ("identity_in_a_format_1_file", _edit({"format": "tve_temporal_adapter/1"}),
     r": holds a tensor 'identity.base' that is not part of a temporal adapter; expected only tensors named "
     r"temporal.…, query.…$"),
    # tensor values: shape, dtype, non-finite
    ("matrix_of_another_shape", _tensor(f"{B}.k", lambda t: t[:, :4].contiguous()),
     r": its tensor 'temporal.input.1.0.k' has shape \(8, 4\); expected \(8, 8\) \(a 'stam' temporal attention of 8 "
     r"channels\)"),
    ("gain_a_vector", _tensor(f"{B}.gain", lambda t: t.reshape(1)),
     r": its tensor 'temporal.input.1.0.gain' has shape \(1,\); expected \(\)"),
    ("integer_weights", _tensor(f"{B}.q", lambda t: t.long()),
     r": its tensor 'temporal.input.1.0.q' holds torch.int64 values; expected floating-point weights"),
    ("boolean_weights", _tensor(f"{B}.u_q", lambda t: t > 0),
     r": its tensor 'temporal.input.1.0.u_q' holds torch.bool values; expected floating-point weights"),
    ("nan_weight", _tensor(f"{B}.q", _nan_at), r": its tensor 'temporal.input.1.0.q' has 1 of 64 values NaN or "
                                               r"infinite; expected finite weights"),
    ("inf_gain", _tensor(f"{B}.gain", lambda t: torch.tensor(float("inf"))),
     r": its tensor 'temporal.input.1.0.gain' has 1 of 1 values NaN or infinite"),
    ("nan_query_delta", _tensor(Q1, _nan_at), rf": its tensor '{re.escape(Q1)}' has 1 of 64 values NaN or infinite"),
    ("query_delta_a_vector", _tensor(Q1, lambda t: t.reshape(-1)),
     rf": its tensor '{re.escape(Q1)}' has shape \(64,\); expected a 2-D weight delta"),
    ("nan_identity", _tensor("identity.base", _nan_at), r": its tensor 'identity.base' has 1 of 40 values NaN"),
    ("identity_a_matrix", _tensor("identity.base", lambda t: t.reshape(4, 10)),
     r": its tensor 'identity.base' has shape \(4, 10\); expected \(40,\) \(a 1-D list of weight samples\)"),
]


@pytest.mark.parametrize("case, damage, error", DAMAGES, ids=[d[0] for d in DAMAGES])
def test_a_damaged_or_foreign_adapter_file_is_one_error_naming_adapter_name_the_file_and_what_was_expected(
        tmp_path, case, damage, error):
    path = str(tmp_path / f"{case}.safetensors")
    if damage == "torch_zip":
        torch.save({"q": torch.zeros(2)}, path)
    elif isinstance(damage, type(lambda: 0)) and damage.__code__.co_argcount == 1:
        with open(path, "wb") as f:
            f.write(damage(_good_bytes()))
    else:
        metadata, tensors = _contents()
        damage(metadata, tensors)
        safetensors.torch.save_file(tensors, path, metadata=metadata)
    with pytest.raises(ValueError) as caught:
        load_adapter(path)
    message = str(caught.value)
    assert message.startswith(f"adapter_name: {path}"), message
    assert re.search(error, message[len(f"adapter_name: {path}"):]), message
    assert "\n" not in message


def test_an_adapter_file_of_half_precision_tensors_loads_as_float32(tmp_path):
    metadata, tensors = _contents()
    path = str(tmp_path / "half.safetensors")
    safetensors.torch.save_file({k: v.half() for k, v in tensors.items()}, path, metadata=metadata)
    loaded = load_adapter(path)
    assert all(t.dtype == torch.float32 for state in loaded.temporal.values() for t in state.values())
    assert all(t.dtype == torch.float32 for t in loaded.query_diffs.values())


def test_an_adapter_without_identity_is_written_and_read_as_format_1(tmp_path):
    import dataclasses
    path = str(tmp_path / "old.safetensors")
    save_adapter(dataclasses.replace(adapter(), identity=None), path)
    with safetensors.safe_open(path, framework="pt") as f:
        assert f.metadata()["format"] == "tve_temporal_adapter/1" and not any(k.startswith("identity.")
                                                                               for k in f.keys())
    assert load_adapter(path).identity is None
