"""Test harness: the pack is imported as package ``tve`` whatever its folder is called.

The host is ``COMFYUI_PATH`` or, when the pack sits in ``ComfyUI/custom_nodes/``, that ComfyUI: it is imported
in-process on the CPU and every test runs against it, the ``real_host`` and e2e ones included. Without a host the
nodes run against the stand-in in ``tests/stand_in`` (a recording ModelPatcher and the few comfy functions the
nodes call) and the ``real_host`` tests skip with a reason.
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

from tve.tools._tve_alias import find_comfyui, real_host  # noqa: E402  (the tools find their host the same way)

COMFYUI_PATH = find_comfyui()
if COMFYUI_PATH:
    os.environ["COMFYUI_PATH"] = COMFYUI_PATH     # the helpers (tests/hosts.py, e2e) read it from the environment
# Idle OpenMP workers sleep instead of spinning: on a loaded 2-core machine spinning stalls torch ~20x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _select_host() -> None:
    """Import the real ComfyUI on the CPU, or put the stand-in host's ``comfy``/``folder_paths`` on the path."""
    if COMFYUI_PATH:
        if not (Path(COMFYUI_PATH) / "comfy" / "model_patcher.py").is_file():
            raise RuntimeError(f"COMFYUI_PATH={COMFYUI_PATH} is not a ComfyUI checkout")
        real_host()                           # on the CPU (no CUDA on CI machines), as the tools import it
    else:
        sys.path.insert(0, str(ROOT / "tests" / "stand_in"))


_select_host()

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "real_host: needs the real ComfyUI (set COMFYUI_PATH to an extracted checkout)")


def pytest_report_header(config):
    if not COMFYUI_PATH:
        return "TVE host: stand-in (tests/stand_in); real_host and e2e tests skip"
    from tve.engine import host
    return f"TVE host: ComfyUI {host.comfyui_version()} at {COMFYUI_PATH}"


def pytest_collection_modifyitems(config, items):
    if COMFYUI_PATH:
        return
    skip = pytest.mark.skip(reason="real ComfyUI host needed: set COMFYUI_PATH to a ComfyUI checkout, or clone the "
                                   "pack into ComfyUI/custom_nodes/")
    for item in items:
        if "real_host" in item.keywords:
            item.add_marker(skip)
