"""Custom sockets: TVE_-prefixed types, and a foreign value on one is refused with one error naming the input."""
import pytest
import torch

from tve.nodes import NODE_CLASS_MAPPINGS
from tve.engine import sockets
from tve.tests.hosts import make_latent, make_tiny_model, make_vae

CUSTOM = {sockets.FLOW, sockets.TRAJECTORIES, sockets.INVERSION, sockets.TEMPORAL_ADAPTER}
FOREIGN = {"frames": 4, "forward": None}                    # what another pack's FLOW might carry


def socket_types(cls) -> set[str]:
    spec = cls.INPUT_TYPES()
    inputs = {**spec.get("required", {}), **spec.get("optional", {})}
    return {t for t, *_ in inputs.values() if isinstance(t, str)} | {t for t in cls.RETURN_TYPES if isinstance(t, str)}


def test_every_custom_socket_type_has_the_pack_prefix():
    builtin = {"MODEL", "LATENT", "IMAGE", "CONDITIONING", "SIGMAS", "VAE", "INT", "FLOAT", "STRING", "BOOLEAN",
               "COMBO", "OPTICAL_FLOW"}             # core's own: Load Optical Flow Model (0.33+)
    used = set().union(*(socket_types(cls) for cls in NODE_CLASS_MAPPINGS.values())) - builtin
    assert used == CUSTOM


def custom_inputs():
    for node_id, cls in sorted(NODE_CLASS_MAPPINGS.items()):
        spec = cls.INPUT_TYPES()
        for name, (socket, *_) in {**spec.get("required", {}), **spec.get("optional", {})}.items():
            if isinstance(socket, str) and socket in CUSTOM:
                yield node_id, name, socket


def arguments(cls, foreign_input: str) -> dict:
    """Valid-looking values for every input of ``cls``, and the foreign dict on ``foreign_input``."""
    spec = cls.INPUT_TYPES()["required"]
    values = {}
    for name, (socket, *rest) in spec.items():
        options = rest[0] if rest else {}
        if socket == "COMBO":
            values[name] = options.get("default", options["options"][0])
        elif socket in ("INT", "FLOAT", "BOOLEAN"):
            values[name] = options.get("default", 0)
        elif socket == "MODEL":
            values[name] = make_tiny_model("sd15")
        elif socket == "LATENT":
            values[name] = make_latent(4, 8, 8)
        elif socket == "IMAGE":
            values[name] = torch.rand(4, 64, 64, 3)
        elif socket == "VAE":
            values[name] = make_vae()
        else:
            values[name] = FOREIGN
    values[foreign_input] = FOREIGN
    return values


@pytest.mark.parametrize("node_id, name, socket", list(custom_inputs()))
def test_a_foreign_value_on_a_custom_socket_is_refused_naming_the_input(node_id, name, socket):
    cls = NODE_CLASS_MAPPINGS[node_id]
    with pytest.raises(TypeError) as error:
        getattr(cls(), cls.FUNCTION)(**arguments(cls, name))
    message = str(error.value)
    assert message.startswith(f"{name}: expected a {socket} from {sockets.PRODUCERS[socket]}")
    assert "dict" in message
