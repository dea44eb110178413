"""Test harness: the pack is imported as package ``tve`` whatever its folder is called.

Without ``COMFYUI_PATH`` the nodes run against the stand-in host in ``tests/stand_in`` (a recording
ModelPatcher and the few comfy functions the nodes call). With ``COMFYUI_PATH`` set, the real ComfyUI is
imported in-process on the CPU and the same tests, plus the ``real_host`` ones, run against it.
"""
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _register_pack_alias() -> None:
    """Make ``import tve.flow...`` work without running the root ``__init__`` (which registers nodes)."""
    if "tve" in sys.modules:
        return
    pkg = types.ModuleType("tve")
    pkg.__path__ = [str(ROOT)]
    pkg.__file__ = str(ROOT / "__init__.py")
    pkg.__package__ = "tve"
    sys.modules["tve"] = pkg


_register_pack_alias()

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
# Idle OpenMP workers sleep instead of spinning: on a loaded 2-core machine spinning stalls torch ~20x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _select_host() -> None:
    """Import the real ComfyUI on the CPU, or put the stand-in host's ``comfy``/``folder_paths`` on the path."""
    if COMFYUI_PATH:
        if not (Path(COMFYUI_PATH) / "comfy" / "model_patcher.py").is_file():
            raise RuntimeError(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout")
        sys.path.insert(0, str(Path(COMFYUI_PATH).resolve()))
        from comfy.cli_args import args
        args.cpu = True                       # before comfy.model_management: no CUDA on CI machines
        import comfy.model_management  # noqa: F401
    else:
        sys.path.insert(0, str(ROOT / "tests" / "stand_in"))


_select_host()

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "real_host: needs the real ComfyUI (set COMFYUI_PATH to an extracted checkout)")


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason="real ComfyUI host needed: set COMFYUI_PATH to a ComfyUI checkout")
    for item in items:
        if "real_host" in item.keywords:
            item.add_marker(skip)
