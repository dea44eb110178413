"""Stand-in for ComfyUI's ``comfy_api.latest``: the V3 node schema module ``io``, nothing else."""
from . import io

__all__ = ["io"]
