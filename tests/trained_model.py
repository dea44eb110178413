"""The pack's trained test models (``tools/test_model``, ``tools/test_model_256``) inside the real ComfyUI: real
host only.

``load_trained_model(testbed)`` builds comfy's SD15 ``BaseModel`` from the ``unet_config`` stored with the weights
(``tools/train_test_model.load``: ``host.build_model``, comfy's own classes), loads the fp16 weights into it (fp32,
frozen) and returns its ``ModelPatcher``; ``trained_conditioning(name, testbed)`` is the CONDITIONING of one of the
embeddings it was trained with: ``source`` (frames as rendered), ``target`` (``target_style``) or ``empty``.
``testbed`` is a key of ``tools.train_test_model.TESTBEDS``: ``test_model`` (128 px frames, 16 x 16 latents, the
default) or ``test_model_256`` (256 px, 32 x 32 latents, four UNet levels).
"""
from __future__ import annotations

import functools
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"
MODEL_DIR = TOOLS / "test_model"
WEIGHTS = MODEL_DIR / "unet.safetensors"
EMBEDDINGS = MODEL_DIR / "conditioning.safetensors"


@functools.lru_cache(maxsize=2)
def _loaded(testbed: str):
    from tve.tools.train_test_model import TESTBEDS, load
    if testbed not in TESTBEDS:
        raise ValueError(f"testbed: expected one of {sorted(TESTBEDS)}, got '{testbed}'")
    return load(TOOLS / testbed)


def load_trained_model(testbed: str = "test_model"):
    """A fresh clone of the trained model's ModelPatcher (the weights are read once per session)."""
    return _loaded(testbed)[0].clone()


def trained_conditioning(name: str, testbed: str = "test_model") -> list:
    """SD1.5 CONDITIONING ``[[embedding (1, 77, 768) float32, {}]]`` for ``source``, ``target`` or ``empty``."""
    conditioning = _loaded(testbed)[1]
    if name not in conditioning:
        raise ValueError(f"name: expected one of {sorted(conditioning)}, got '{name}'")
    return conditioning[name]
