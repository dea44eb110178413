"""Import helper for the tools and benchmarks: the pack as package ``tve`` (like tests/conftest.py), and the real host.

``import _tve_alias`` (with ``tools/`` on ``sys.path``, as it is for ``python tools/<script>.py``) registers the
alias; ``real_host()`` imports ComfyUI on the CPU from ``COMFYUI_PATH`` or, when the pack sits in
``ComfyUI/custom_nodes/``, from that ComfyUI (``comfyui_around``; the test suite finds its host the same way).
"""
from __future__ import annotations

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


def comfyui_around(pack: Path) -> Path | None:
    """The ComfyUI whose ``custom_nodes/`` holds ``pack``: two levels up, with ``main.py`` and ``comfy/``."""
    around = pack.parents[1]
    if pack.parent.name == "custom_nodes" and (around / "main.py").is_file() \
            and (around / "comfy" / "model_patcher.py").is_file():
        return around
    return None


def find_comfyui() -> str | None:
    """``COMFYUI_PATH``, else the ComfyUI this pack sits in (the folder as reached, e.g. a symlink in custom_nodes,
    or its real location), else None."""
    if os.environ.get("COMFYUI_PATH"):
        return os.environ["COMFYUI_PATH"]
    for pack in (Path(__file__).absolute().parents[1], ROOT):
        if comfyui_around(pack) is not None:
            return str(comfyui_around(pack))
    return None


def real_host(sdpa_attention: bool = False) -> Path:
    """Import ComfyUI on the CPU and return its folder; ``sdpa_attention`` selects torch SDPA attention
    (``--use-pytorch-cross-attention`` on the command line)."""
    path = find_comfyui()
    if not path:
        sys.exit("this tool runs on the real ComfyUI: clone the pack into ComfyUI/custom_nodes/ or set COMFYUI_PATH "
                 "to a ComfyUI checkout")
    sys.path.insert(0, str(Path(path).resolve()))
    from comfy.cli_args import args
    args.cpu = True
    args.use_pytorch_cross_attention = sdpa_attention
    import comfy.model_management  # noqa: F401
    return Path(path).resolve()
