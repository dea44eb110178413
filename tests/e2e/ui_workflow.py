"""UI-format workflows (what the frontend saves) checked against /object_info and converted to API graphs.

Written from the frontend's rules (comfyui_frontend_package 1.27 and 1.48), independently of
tools/build_workflows.py. ``widgets_values`` holds a node's widget values in the order the frontend creates the
widgets: the required inputs in ``input_order``, then the optional ones; a control_after_generate value after every
input declaring ``control_after_generate`` and every INT named seed / noise_seed that does not declare it False; the
upload button's value after the required widgets of a node with an image/video upload combo; and after a V3
dynamic combo (``COMFY_DYNAMICCOMBO_V3``, a combo of option keys) the widgets of the option it holds, named
``<combo>.<input>``. Loading maps the values onto the widgets by position: a file may stop before trailing optional
widgets that its node gained later (the frontend leaves them at their defaults, and posts those), never before a
required one. An input slot with a ``widget`` entry is a widget converted to a socket; its link wins over its saved
value. Output slots are by index: a file may list fewer than the node has now (the frontend adds the new ones).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

VIRTUAL_NODES = {"Note", "MarkdownNote"}      # frontend-only, never sent to the server
UNRESOLVED_NODES = {"PrimitiveNode", "Reroute"}  # virtual nodes the frontend resolves; not followed here
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"       # V3: a combo whose chosen option brings its own inputs
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}
UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")
WORKFLOW_KEYS = ("last_node_id", "last_link_id", "nodes", "links", "version")      # the frontend's zod schema
NODE_KEYS = ("id", "type", "pos", "size", "flags", "order", "mode", "properties")


def inputs_of(info: Mapping) -> dict[str, tuple[list, bool]]:
    """name -> (spec, optional) for the required then optional inputs, in ``input_order``."""
    return {name: (info["input"][group][name], group == "optional")
            for group in ("required", "optional") for name in info["input_order"].get(group, [])}


def kind(spec: list) -> str:
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec: list) -> bool:
    return kind(spec) in WIDGET_TYPES and not options(spec).get("forceInput")


def is_unmodelled(spec: list) -> bool:
    """A V3 dynamic input type other than the dynamic combo: the frontend builds its sockets from the node's
    connections at run time (autogrow, match-type), which this checker does not follow."""
    return kind(spec).startswith("COMFY_") and kind(spec).endswith("_V3") and kind(spec) != DYNAMIC_COMBO


def combo_choices(spec: list) -> list:
    if kind(spec) == DYNAMIC_COMBO:
        return [option["key"] for option in options(spec)["options"]]
    return spec[0] if isinstance(spec[0], list) else options(spec).get("options", [])


def dynamic_inputs(name: str, spec: list, key: Any) -> dict[str, tuple[list, bool]]:
    """The inputs the dynamic combo ``name`` adds while it holds ``key``: ``name.<input>`` -> (spec, optional),
    required then optional, as the frontend inserts them after the combo."""
    chosen = next((o["inputs"] for o in options(spec)["options"] if o["key"] == key), {})
    return {f"{name}.{child}": (child_spec, group == "optional")
            for group in ("required", "optional") for child, child_spec in chosen.get(group, {}).items()}


@dataclass(frozen=True)
class Slot:
    """One ``widgets_values`` entry: the input it sets (None for the frontend's control and upload entries)."""
    name: str | None
    spec: list | None = None
    optional: bool = False


def has_control(name: str, spec: list) -> bool:
    # useIntWidget: inputSpec.control_after_generate ?? (name is seed / noise_seed)
    return bool(options(spec).get("control_after_generate", kind(spec) == "INT" and name in ("seed", "noise_seed")))


def default_of(spec: list) -> Any:
    """What the frontend puts in a new widget: the declared default, else a combo's first choice; None if neither."""
    if "default" in options(spec):
        return options(spec)["default"]
    choices = combo_choices(spec) if kind(spec) in ("COMBO", DYNAMIC_COMBO) else []
    return choices[0] if choices else None


def layout(info: Mapping, values: Sequence = ()) -> tuple[list[Slot], dict[str, tuple[list, bool]]]:
    """The node's ``widgets_values`` entries for the saved ``values`` (a dynamic combo's entries depend on the
    option it holds), and every input it then declares (dynamic combos' inputs included): name -> (spec,
    optional)."""
    slots: list[Slot] = []
    declared: dict[str, tuple[list, bool]] = {}

    def add(name: str, spec: list, optional: bool) -> None:
        declared[name] = (spec, optional)
        if not is_widget(spec):
            return
        slots.append(Slot(name, spec, optional))
        held = values[len(slots) - 1] if len(slots) <= len(values) else default_of(spec)
        if has_control(name, spec):
            slots.append(Slot(None))
        if kind(spec) == DYNAMIC_COMBO:
            for child, (child_spec, child_optional) in dynamic_inputs(name, spec, held).items():
                add(child, child_spec, optional or child_optional)

    top = inputs_of(info)
    for optional in (False, True):
        group = [(n, s) for n, (s, opt) in top.items() if opt == optional]
        for name, spec in group:
            add(name, spec, optional)
        if not optional and any(options(s).get(flag) for _, s in group if is_widget(s) for flag in UPLOAD_FLAGS):
            slots.append(Slot(None))
    return slots, declared


def widget_slots(info: Mapping, values: Sequence = ()) -> list[str | None]:
    """The input each ``widgets_values`` entry sets, in order; None for the frontend's own entries."""
    return [slot.name for slot in layout(info, values)[0]]


def filled_values(info: Mapping, values: Sequence) -> list:
    """``values`` as the frontend holds them after loading: trailing widgets the file has no value for (optional
    inputs the node gained after the file was written) at their defaults."""
    slots, _ = layout(info, values)
    return list(values[:len(slots)]) + [default_of(slot.spec) if slot.name else None for slot in slots[len(values):]]


def accepts(accepted: str, produced: str) -> bool:
    return accepted == "*" or produced in accepted.split(",")


def problems(workflow: Mapping, object_info: Mapping) -> list[str]:
    """What in ``workflow`` the server would not understand: unknown node types, inputs, outputs or widgets,
    unlinked required sockets, widget values of the wrong kind, links whose types do not match."""
    found = [f"missing top-level key '{key}'" for key in WORKFLOW_KEYS if key not in workflow]
    if workflow.get("version") != 0.4:
        found.append(f"version {workflow.get('version')!r}: expected the frontend's 0.4 format")
    found += [f"node {node.get('id')}: missing key '{key}'" for node in workflow["nodes"] for key in NODE_KEYS
              if key not in node]
    found += [f"link {link}: expected [id, from node, from slot, to node, to slot, type]"
              for link in workflow["links"] if len(link) != 6]
    if found:
        return found
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in workflow["nodes"]:
        found += [f"node {node['id']} ({node['type']}): {p}" for p in _node_problems(node, object_info)]
    for link in workflow["links"]:
        found += [f"link {link[0]}: {p}" for p in _link_problems(link, nodes, object_info)]
    linked = {link[0] for link in workflow["links"]}
    for node in workflow["nodes"]:
        for entry in node.get("inputs", []):
            if entry.get("link") is not None and entry["link"] not in linked:
                found.append(f"node {node['id']} ({node['type']}).{entry['name']}: link {entry['link']} does not exist")
    return found


def _node_problems(node: Mapping, object_info: Mapping) -> list[str]:
    if node["type"] in VIRTUAL_NODES:
        return []
    if node["type"] in UNRESOLVED_NODES:
        return ["frontend-resolved virtual node: link the widget or value directly instead"]
    if node["type"] not in object_info:
        return ["node type is not in /object_info"]
    info, found = object_info[node["type"]], []
    if node.get("mode", 0) != 0:
        found.append(f"mode {node['mode']}: a shipped workflow runs every node")
    values = node.get("widgets_values", [])
    slots, declared = layout(info, values)
    found += [f"input '{name}' is a {kind(spec)}: the checker does not model it" for name, (spec, _) in
              declared.items() if is_unmodelled(spec)]
    for entry in node.get("inputs", []):
        if entry["name"] not in declared:
            found.append(f"input '{entry['name']}' does not exist")
            continue
        spec, _ = declared[entry["name"]]
        if is_widget(spec) and "widget" not in entry:
            found.append(f"input '{entry['name']}' is a widget but the slot is not marked as one")
        if entry["type"] != kind(spec):
            found.append(f"input '{entry['name']}' has type {entry['type']}, the node takes {kind(spec)}")
    linked = {e["name"] for e in node.get("inputs", []) if e.get("link") is not None}
    for name, (spec, optional) in declared.items():
        if not optional and not is_widget(spec) and name not in linked:
            found.append(f"required input '{name}' is not linked")
    for slot, output in enumerate(node.get("outputs", [])):
        if slot >= len(info["output"]):
            found.append(f"output slot {slot} ('{output['name']}') does not exist")
        elif (output["name"], output["type"]) != (info["output_name"][slot], info["output"][slot]):
            found.append(f"output slot {slot} is '{output['name']}' {output['type']}, the node has "
                         f"'{info['output_name'][slot]}' {info['output'][slot]}")
    names = [slot.name for slot in slots]
    missing = slots[len(values):]
    if len(values) > len(slots):
        found.append(f"{len(values)} widget values for the node's {len(slots)} widget entries {names}")
    elif any(not slot.optional or slot.name is None or default_of(slot.spec) is None for slot in missing):
        found.append(f"{len(values)} widget values for the node's {len(slots)} widget entries {names}: only "
                     "trailing optional inputs with a default may be left out")
    for slot, value in zip(slots, values):
        found += _value_problems(slot.name, slot.spec, value) if slot.name else []
    return found


def _value_problems(name: str, spec: list, value: Any) -> list[str]:
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool, "COMBO": str,
                DYNAMIC_COMBO: str}[kind(spec)]
    if (isinstance(value, bool) and kind(spec) != "BOOLEAN") or not isinstance(value, expected):
        return [f"widget '{name}' = {value!r} is not a {kind(spec)}"]
    if kind(spec) == DYNAMIC_COMBO and value not in combo_choices(spec):
        return [f"widget '{name}' = {value!r} is not one of its options {combo_choices(spec)}"]
    limits = options(spec)
    if kind(spec) in ("INT", "FLOAT") and not limits.get("min", value) <= value <= limits.get("max", value):
        return [f"widget '{name}' = {value} is outside [{limits.get('min')}, {limits.get('max')}]"]
    return []


def _link_problems(link: list, nodes: Mapping, object_info: Mapping) -> list[str]:
    link_id, source_id, out_slot, target_id, in_slot, link_type = link
    source, target = nodes.get(source_id), nodes.get(target_id)
    if source is None or target is None:
        return [f"connects missing node {source_id if source is None else target_id}"]
    if source["type"] not in object_info or target["type"] not in object_info:
        return []                                        # reported with the node
    produced = object_info[source["type"]]["output"]
    if out_slot >= len(produced):
        return [f"{source['type']} has no output slot {out_slot}"]
    if in_slot >= len(target.get("inputs", [])) or target["inputs"][in_slot].get("link") != link_id:
        return [f"{target['type']} input slot {in_slot} does not hold this link"]
    if link_id not in (source["outputs"][out_slot].get("links") or []):
        return [f"{source['type']} output slot {out_slot} does not list this link"]
    name = target["inputs"][in_slot]["name"]
    _, declared = layout(object_info[target["type"]], target.get("widgets_values", []))
    if name not in declared:
        return []                                        # reported with the node
    accepted = kind(declared[name][0])
    if link_type != produced[out_slot] or not accepts(accepted, produced[out_slot]):
        return [f"type {link_type}: {source['type']} output {out_slot} gives {produced[out_slot]}, "
                f"{target['type']}.{name} takes {accepted}"]
    return []


def to_api(workflow: Mapping, object_info: Mapping) -> dict[str, dict]:
    """The API graph the frontend would queue: ``{id: {class_type, inputs, _meta}}``; links become
    ``[source id, output slot]``. Raises ValueError if the workflow has problems."""
    found = problems(workflow, object_info)
    if found:
        raise ValueError("workflow has problems:\n  " + "\n  ".join(found))
    links = {link[0]: link for link in workflow["links"]}
    graph = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES:
            continue
        info = object_info[node["type"]]
        values = node.get("widgets_values", [])
        inputs = {name: value for name, value in zip(widget_slots(info, values), filled_values(info, values))
                  if name}
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                link = links[entry["link"]]
                inputs[entry["name"]] = [str(link[1]), link[2]]
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                  "_meta": {"title": node.get("title", node["type"])}}
    return graph
