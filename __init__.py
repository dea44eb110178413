"""ComfyUI-TextVideoEdit (TVE): training-free, text-driven, temporally consistent video editing for ComfyUI.

Loaded by ComfyUI from ``custom_nodes/<any folder name>/``; registers the V1 node classes of ``nodes/`` and the
small frontend extension in ``web/`` (it shows TVE_ConsistencyMetrics' numbers on the node).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
