"""Stand-in for ComfyUI's V3 node schema (``comfy_api.latest.io``): the subset TVE's node classes use.

A node class declares an ``io.Schema`` in ``define_schema`` and runs in the classmethod ``execute``, which returns an
``io.NodeOutput``. Core's loader and server read the V1 view of such a class, derived from its schema:
``INPUT_TYPES`` (inputs by id under required/optional, a combo as ``("COMBO", {"options": [...], ...})``, and the
hidden prompt and extra_pnginfo of an output node), ``RETURN_TYPES`` and ``RETURN_NAMES`` (lists; an output without a
display name is named by its type), ``FUNCTION``, ``OUTPUT_NODE``, ``DESCRIPTION`` and ``CATEGORY``. This module
derives them the way ComfyUI 0.3.64 and 0.33.0 both do (``tests/test_pack_loading.py`` compares the two on a real
host); options left at None are left out, as core prunes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _set(**options: Any) -> dict:
    """The options that are set (core's ``prune_dict``)."""
    return {key: value for key, value in options.items() if value is not None}


class _Input:
    """One input socket or widget: its id, whether it is optional, and its V1 options (those that are set)."""
    io_type = ""
    takes: tuple[str, ...] = ()                        # the keyword options this type's Input takes
    fixed: dict = {}                                   # options core adds to every input of the type

    def __init__(self, id: str, *, optional: bool = False, tooltip: str | None = None, **options: Any):
        unknown = set(options) - set(self.takes)
        if unknown:
            raise TypeError(f"{type(self).__qualname__} takes no {sorted(unknown)}")
        self.id = id
        self.optional = optional
        self.v1_options = {**self.fixed, **_set(tooltip=tooltip, **options)}

    def v1(self) -> tuple[str, dict]:
        return self.io_type, dict(self.v1_options)


class _Output:
    """One output: its V1 type and the name the graph editor shows (the type when no display name is given)."""
    io_type = ""

    def __init__(self, *, display_name: str | None = None, tooltip: str | None = None):
        self.display_name = display_name
        self.tooltip = tooltip

    @property
    def name(self) -> str:
        return self.display_name or self.io_type


def _socket_type(io_type: str, takes: tuple[str, ...] = (), fixed: dict | None = None) -> type:
    """A socket type with ``Input`` (taking the keyword options ``takes``) and ``Output`` classes."""
    return type(io_type, (), {
        "io_type": io_type,
        "Input": type("Input", (_Input,), {"io_type": io_type, "takes": takes, "fixed": fixed or {}}),
        "Output": type("Output", (_Output,), {"io_type": io_type})})


def Custom(io_type: str) -> type:
    """A socket type of its own name: ``Custom("TVE_FLOW").Input("flow", tooltip=...)`` and ``.Output(...)``."""
    return _socket_type(io_type)


Image, Latent, Conditioning, Sigmas, Vae, Model = (Custom(name) for name in
                                                   ("IMAGE", "LATENT", "CONDITIONING", "SIGMAS", "VAE", "MODEL"))
Int = _socket_type("INT", ("default", "min", "max", "step", "control_after_generate"))
Float = _socket_type("FLOAT", ("default", "min", "max", "step", "round"))
Boolean = _socket_type("BOOLEAN", ("default",))
String = _socket_type("STRING", ("default",), fixed={"multiline": False})


class Combo:
    """A dropdown: V1 type ``COMBO``, its choices under ``options``."""
    io_type = "COMBO"

    class Input(_Input):
        io_type = "COMBO"
        takes = ("default",)
        fixed = {"multiselect": False}

        def __init__(self, id: str, options: list[str], **kwargs: Any):
            super().__init__(id, **kwargs)
            self.v1_options["options"] = options


class Hidden:
    """The hidden inputs core gives an output node (its ``io.Hidden`` members of those names)."""
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"


@dataclass
class Schema:
    """A node's declaration: id, display name, category, description, inputs in order, outputs, output-node flag."""
    node_id: str
    display_name: str
    category: str
    description: str
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    is_output_node: bool = False


class NodeOutput:
    """What ``execute`` returns: the output values (``result``, None for none) and what the node shows (``ui``)."""

    def __init__(self, *args: Any, ui: dict | None = None):
        self.args = args
        self.ui = ui

    @property
    def result(self) -> tuple | None:
        return self.args if self.args else None


class _ClassProperty:
    """A read-only attribute of the class computed by ``getter(cls)``: the V1 view of the schema."""

    def __init__(self, getter):
        self.getter = getter

    def __get__(self, instance, owner):
        return self.getter(owner)


class ComfyNode:
    """Base of a V3 node class; the V1 attributes core's loader reads come from ``define_schema()``."""

    @classmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError(f"{cls.__name__} defines no schema")

    @classmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError(f"{cls.__name__} defines no execute")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, dict]:
        schema = cls.define_schema()
        spec: dict[str, dict] = {"required": {}}
        for i in schema.inputs:
            spec.setdefault("optional" if i.optional else "required", {})[i.id] = i.v1()
        if schema.is_output_node:
            spec["hidden"] = {"prompt": (Hidden.prompt,), "extra_pnginfo": (Hidden.extra_pnginfo,)}
        return spec

    FUNCTION = "EXECUTE_NORMALIZED"
    RETURN_TYPES = _ClassProperty(lambda cls: [o.io_type for o in cls.define_schema().outputs])
    RETURN_NAMES = _ClassProperty(lambda cls: [o.name for o in cls.define_schema().outputs])
    OUTPUT_NODE = _ClassProperty(lambda cls: cls.define_schema().is_output_node)
    DESCRIPTION = _ClassProperty(lambda cls: cls.define_schema().description)
    CATEGORY = _ClassProperty(lambda cls: cls.define_schema().category)

    @classmethod
    def EXECUTE_NORMALIZED(cls, **inputs: Any) -> NodeOutput:
        """What core's executor calls (``FUNCTION``): ``execute``, whose NodeOutput it reads."""
        out = cls.execute(**inputs)
        if not isinstance(out, NodeOutput):
            raise TypeError(f"{cls.__name__}.execute returned a {type(out).__name__}, not an io.NodeOutput")
        return out
