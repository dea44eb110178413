"""TVE's ComfyUI nodes: node classes only, on ComfyUI's V3 node schema (``comfy_api.latest.io``), each a thin shell
over one engine call (``engine/``)."""
from ..engine import host, identity
from .edit_nodes import NODES as _EDIT_NODES
from .flow_nodes import NODES as _FLOW_NODES
from .inversion_node import NODES as _INVERSION_NODES
from .measure_nodes import NODES as _MEASURE_NODES
from .one_shot_nodes import NODES as _ONE_SHOT_NODES
from .text2video_node import NODES as _TEXT2VIDEO_NODES

host.register_optical_flow_folder()
host.register_adapter_folder()

_ALL = {**_FLOW_NODES, **_INVERSION_NODES, **_EDIT_NODES, **_TEXT2VIDEO_NODES, **_MEASURE_NODES, **_ONE_SHOT_NODES}
if set(_ALL) != set(identity.ALL):
    raise RuntimeError(f"TVE: nodes without a class: {sorted(n.id for n in set(identity.ALL) - set(_ALL))}")
NODE_CLASS_MAPPINGS = {node.id: cls for node, cls in _ALL.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node.id: node.display for node in _ALL}
