"""The pack loads the way ComfyUI loads custom nodes, from a folder of any name, and registers V3 nodes (ComfyUI's
node schema, ``comfy_api.latest``) that core's loader reads through the V1 view it derives from each schema."""
import importlib.util
import json
import os
import sys

import pytest

from tve.tests.hosts import REAL_HOST

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAND_IN = os.path.join(ROOT, "tests", "stand_in")
EXPECTED_NODES = {"TVE_OpticalFlow", "TVE_FlowTrajectories", "TVE_PreviewFlow", "TVE_PreviewTrajectories",
                  "TVE_DDIMInversion", "TVE_ApplyFeatureInjection", "TVE_ApplyCrossFrameAttention",
                  "TVE_ApplyTokenFlow", "TVE_ApplyFLATTEN", "TVE_MotionDynamicsLatents", "TVE_ConsistencyMetrics",
                  "TVE_FrameWindows", "TVE_PreviewFeatures", "TVE_OneShotTune", "TVE_SaveTemporalAdapter", "TVE_LoadTemporalAdapter"}


def load_as(folder, module_name):
    """Import the pack's __init__ the way ComfyUI does: a package whose name is not ``tve``."""
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(folder, "__init__.py"),
                                                  submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def odd_folder(tmp_path):
    """The repository seen through a folder name that is not a valid Python identifier."""
    link = tmp_path / "ComfyUI-TextVideoEdit copy.v2"
    link.symlink_to(ROOT, target_is_directory=True)
    return str(link)


def test_root_registers_every_node_with_prefix_category_and_v3_schema(odd_folder):
    pack = load_as(odd_folder, "_tve_loading_probe")
    mappings, names = pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS
    assert set(mappings) == EXPECTED_NODES and set(names) == EXPECTED_NODES
    for node_id, cls in mappings.items():
        assert node_id.startswith("TVE_") and names[node_id].endswith("(TVE)")
        schema = cls.define_schema()                                     # V3: the schema is the one declaration
        assert (schema.node_id, schema.display_name, schema.category) == (node_id, names[node_id], "video editing/TVE")
        assert {"define_schema", "execute"} <= set(vars(cls))
        # the V1 view core's loader, server and executor read, derived from the schema
        assert cls.CATEGORY == "video editing/TVE" and cls.DESCRIPTION == schema.description
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}
        assert cls.FUNCTION == "EXECUTE_NORMALIZED" and callable(getattr(cls(), cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(schema.outputs)
    assert pack.WEB_DIRECTORY == "./web"


def v1_views(mappings: dict) -> dict:
    """What core reads of each node class (through the JSON the server sends, so tuples and lists compare equal)."""
    return json.loads(json.dumps({node_id: {
        "input": cls.INPUT_TYPES(), "output": list(cls.RETURN_TYPES), "output_name": list(cls.RETURN_NAMES),
        "output_node": cls.OUTPUT_NODE, "description": cls.DESCRIPTION, "category": cls.CATEGORY,
        "function": cls.FUNCTION} for node_id, cls in mappings.items()}))


@pytest.fixture
def modules_restored():
    """``sys.modules`` as it was before the test: modules it imported are dropped, those it replaced put back."""
    before = dict(sys.modules)
    yield
    for name in set(sys.modules) - set(before):
        del sys.modules[name]
    sys.modules.update(before)


@pytest.mark.real_host
def test_the_stand_in_node_schema_derives_what_comfyuis_derives(modules_restored, monkeypatch):
    """The stand-in suite runs the node classes on ``tests/stand_in/comfy_api``: loaded on it, the pack must show
    core the inputs, outputs and flags that ComfyUI's own ``comfy_api.latest.io`` derives from the same schemas."""
    real = v1_views(load_as(ROOT, "_tve_real_schema_probe").NODE_CLASS_MAPPINGS)
    for name in [name for name in sys.modules if name.split(".")[0] == "comfy_api"]:
        del sys.modules[name]                                 # ComfyUI's comfy and the rest stay as imported
    monkeypatch.syspath_prepend(STAND_IN)
    stand_in = v1_views(load_as(ROOT, "_tve_stand_in_schema_probe").NODE_CLASS_MAPPINGS)
    assert os.path.dirname(sys.modules["comfy_api"].__file__) == os.path.join(STAND_IN, "comfy_api")
    assert set(stand_in) == EXPECTED_NODES
    assert stand_in == real


def test_optical_flow_folder_keeps_paths_from_extra_model_paths():
    from tve.engine import host
    with host.model_folder_at("optical_flow", "/artist/flow"):                # what extra_model_paths.yaml made
        host.register_optical_flow_folder()
        paths = host.optical_flow_folders()
        assert paths == [host.default_model_folder("optical_flow"), "/artist/flow"]
        host.register_optical_flow_folder()
        assert host.optical_flow_folders() == paths


@pytest.mark.real_host
def test_comfyui_loads_the_pack_from_custom_nodes_under_any_folder_name(odd_folder):
    from tve.engine import host
    assert host.load_custom_nodes(odd_folder)
    assert EXPECTED_NODES <= host.node_ids()
    info = host.core_node_class("TVE_ApplyCrossFrameAttention").INPUT_TYPES()
    assert "model" in info["required"]


@pytest.mark.skipif(REAL_HOST, reason="checks the stand-in only")
def test_stand_in_is_what_the_suite_runs_against_without_comfyui():
    import comfy
    assert "stand_in" in comfy.__file__


def test_the_suite_finds_the_comfyui_whose_custom_nodes_hold_the_pack(tmp_path):
    from tve.tools._tve_alias import comfyui_around
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "comfy").mkdir(parents=True)
    (comfyui / "custom_nodes").mkdir()
    pack = comfyui / "custom_nodes" / "TVE pack.v2"
    pack.symlink_to(ROOT, target_is_directory=True)
    assert comfyui_around(pack) is None                          # no main.py / comfy/model_patcher.py yet
    (comfyui / "main.py").write_text("")
    (comfyui / "comfy" / "model_patcher.py").write_text("")
    assert comfyui_around(pack) == comfyui
    elsewhere = tmp_path / "src" / "custom_nodes_backup" / "pack"
    elsewhere.mkdir(parents=True)
    assert comfyui_around(elsewhere) is None


def test_every_input_of_every_node_has_a_tooltip_and_every_node_a_description():
    from tve.nodes import NODE_CLASS_MAPPINGS
    missing = []
    for node_id, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        assert len(getattr(cls, "DESCRIPTION", "")) > 40, f"{node_id} has no DESCRIPTION"
        spec = cls.INPUT_TYPES()
        for name, (_, *rest) in {**spec.get("required", {}), **spec.get("optional", {})}.items():
            if not (rest and rest[0].get("tooltip", "").strip()):
                missing.append(f"{node_id}.{name}")
    assert not missing, f"inputs without a tooltip: {missing}"
