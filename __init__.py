"""ComfyUI-TextVideoEdit (TVE): training-free, text-driven, temporally consistent video editing for ComfyUI.

Loaded by ComfyUI from ``custom_nodes/<any folder name>/``; registers the node classes of ``nodes/`` (ComfyUI's V3
node schema, ``comfy_api.latest``, listed in ``NODE_CLASS_MAPPINGS``, which ComfyUI 0.3.64 and later read for V3
classes too) and the small frontend extension in ``web/`` (it shows TVE_ConsistencyMetrics' numbers on the node).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
