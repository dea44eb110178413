"""TVE's ComfyUI nodes: thin classes that turn sockets into calls of ``attention/`` and ``flow/``."""
from . import host
from .cross_frame import NODES as _CROSS_FRAME_NODES
from .flatten import NODES as _FLATTEN_NODES
from .flow_nodes import NODES as _FLOW_NODES
from .injection import NODES as _INJECTION_NODES
from .inversion import NODES as _INVERSION_NODES
from .metrics import NODES as _METRICS_NODES
from .one_shot import NODES as _ONE_SHOT_NODES
from .temporal_adapter import NODES as _TEMPORAL_ADAPTER_NODES
from .text2video_zero import NODES as _TEXT2VIDEO_ZERO_NODES
from .tokenflow import NODES as _TOKENFLOW_NODES
from .windows import NODES as _WINDOWS_NODES

host.register_optical_flow_folder()
host.register_adapter_folder()

_ALL = {**_FLOW_NODES, **_INVERSION_NODES, **_INJECTION_NODES, **_CROSS_FRAME_NODES, **_TOKENFLOW_NODES,
        **_FLATTEN_NODES, **_TEXT2VIDEO_ZERO_NODES, **_METRICS_NODES, **_ONE_SHOT_NODES,
        **_TEMPORAL_ADAPTER_NODES, **_WINDOWS_NODES}
NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (cls, _) in _ALL.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (_, name) in _ALL.items()}
