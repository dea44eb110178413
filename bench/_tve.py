"""Import helper for the benchmarks: the pack as package ``tve`` (like tests/conftest.py), and the real host.

``import _tve`` from a bench script registers the alias; ``_tve.real_host()`` imports ComfyUI from
``COMFYUI_PATH`` on the CPU (or exits with a clear message when it is not set).
"""
import os
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

if "tve" not in sys.modules:
    _pkg = types.ModuleType("tve")
    _pkg.__path__ = [str(ROOT)]
    _pkg.__file__ = str(ROOT / "__init__.py")
    sys.modules["tve"] = _pkg


def real_host() -> None:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        sys.exit("this benchmark runs on the real ComfyUI: set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, str(Path(path).resolve()))
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_management  # noqa: F401
