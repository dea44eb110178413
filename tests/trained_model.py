"""The pack's trained test model (``tools/test_model``) inside the real ComfyUI: real host only.

``load_trained_model()`` builds comfy's SD15 ``BaseModel`` from the ``unet_config`` stored with the weights
(``tools/train_test_model.load``: comfy's own classes), loads the fp16 weights into it (fp32, frozen) and returns
a ``comfy.model_patcher.ModelPatcher``; ``trained_conditioning(name)`` is the CONDITIONING of one of the
embeddings it was trained with: ``source`` (frames as rendered), ``target`` (``target_style``) or ``empty``.
"""
from __future__ import annotations

import functools
from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parents[1] / "tools" / "test_model"
WEIGHTS = MODEL_DIR / "unet.safetensors"
EMBEDDINGS = MODEL_DIR / "conditioning.safetensors"


@functools.lru_cache(maxsize=1)
def _loaded():
    from tve.tools.train_test_model import load
    return load(MODEL_DIR)


def load_trained_model():
    """A fresh clone of the trained model's ModelPatcher (the weights are read once per session)."""
    return _loaded()[0].clone()


def trained_conditioning(name: str) -> list:
    """SD1.5 CONDITIONING ``[[embedding (1, 77, 768) float32, {}]]`` for ``source``, ``target`` or ``empty``."""
    conditioning = _loaded()[1]
    if name not in conditioning:
        raise ValueError(f"name: expected one of {sorted(conditioning)}, got '{name}'")
    return conditioning[name]
