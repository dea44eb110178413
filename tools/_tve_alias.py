"""Import helper for the tools and benchmarks: the pack as package ``tve`` (like tests/conftest.py), and the real host.

``import _tve_alias`` (with ``tools/`` on ``sys.path``, as it is for ``python tools/<script>.py``) registers the
alias; ``real_host()`` imports ComfyUI from ``COMFYUI_PATH`` on the CPU.
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


def real_host(sdpa_attention: bool = False) -> None:
    """Import ComfyUI on the CPU; ``sdpa_attention`` selects torch SDPA attention (``--use-pytorch-cross-attention``
    on the command line)."""
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        sys.exit("this tool runs on the real ComfyUI: set COMFYUI_PATH to a ComfyUI checkout")
    sys.path.insert(0, str(Path(path).resolve()))
    from comfy.cli_args import args
    args.cpu = True
    args.use_pytorch_cross_attention = sdpa_attention
    import comfy.model_management  # noqa: F401
