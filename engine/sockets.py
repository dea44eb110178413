"""TVE's custom socket types, and the check that what arrives on one is what a TVE node made.

Other packs also name sockets ``FLOW``, ``TRAJECTORIES`` or ``INVERSION`` with other contents; the ``TVE_`` prefix
keeps the frontend from linking them to ours, and ``expect`` turns a foreign value that still arrives (an API
prompt, a reroute) into one error naming the input, instead of an ``AttributeError`` deep inside a node.
"""
from __future__ import annotations

from typing import Any

from . import identity

FLOW = "TVE_FLOW"                    # flow.estimate.FlowField
TRAJECTORIES = "TVE_TRAJECTORIES"    # flow.trajectories.Trajectories
INVERSION = "TVE_INVERSION"          # engine.inversion.Inversion
TEMPORAL_ADAPTER = "TVE_TEMPORAL_ADAPTER"  # engine.temporal_adapter.TemporalAdapter

PRODUCERS = {FLOW: identity.OPTICAL_FLOW, TRAJECTORIES: identity.FLOW_TRAJECTORIES, INVERSION: identity.DDIM_INVERSION,
             TEMPORAL_ADAPTER: identity.ONE_SHOT_TUNE}


def expect(value: Any, cls: type, input_name: str, socket: str) -> Any:
    """``value`` if it is a ``cls`` (the content of ``socket``); else a TypeError naming the input and its producer."""
    if not isinstance(value, cls):
        raise TypeError(f"{input_name}: expected a {socket} from {PRODUCERS[socket]}, got a "
                        f"{type(value).__module__}.{type(value).__name__}; connect the output of {PRODUCERS[socket]}")
    return value
