"""The pack's layers, read from its source: no import circle anywhere, the engine never imports the node classes,
the host-free packages import no ComfyUI and nothing above them, and only the host adapter imports comfy
internals (the node classes import ComfyUI's public node API only)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attention", "flow", "engine", "nodes")


def modules() -> dict[str, Path]:
    return {f"{path.parent.name}.{path.stem}": path for package in PACKAGES
            for path in sorted((ROOT / package).glob("*.py"))}


def runtime_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, whether it is the pack's) of every import the module runs, at any depth (``if
    TYPE_CHECKING:`` blocks are type annotations only and are left out). Relative imports are resolved against the
    pack's packages; absolute ones are another distribution's (ComfyUI's ``nodes`` is not the pack's)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and
                 getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                 for n in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, False) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.module or "", False))
                continue
            base = path.parent.name if node.level == 1 else ""
            module = ".".join(p for p in (base, node.module or "") if p)
            for alias in node.names:
                found.append((f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules() else module, True))
    return found


def pack_edges() -> dict[str, set[str]]:
    known = modules()
    edges = {}
    for name, path in known.items():
        pack = [module for module, ours in runtime_imports(path) if ours]
        edges[name] = {module for module in pack if module in known and module != name}
        edges[name] |= {f"{module}.__init__" for module in pack
                        if f"{module}.__init__" in known and f"{module}.__init__" != name}
    return edges


def test_no_module_of_the_pack_imports_itself_back_through_others():
    edges = pack_edges()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for start in sorted(edges):
        if start not in state:
            visit(start, [start])


@pytest.mark.parametrize("package, forbidden", [("engine", ("nodes",)), ("attention", ("engine", "nodes")),
                                                ("flow", ("engine", "nodes"))])
def test_a_layer_never_imports_the_layers_above_it(package, forbidden):
    for name, targets in pack_edges().items():
        if name.startswith(package + "."):
            above = sorted(t for t in targets if t.split(".")[0] in forbidden)
            assert not above, f"{name} imports {above}"


def test_only_the_host_adapter_imports_comfy_internals_and_nodes_import_only_the_public_node_api():
    for name, path in modules().items():
        comfy = sorted({module for module, ours in runtime_imports(path) if not ours
                        and module.split(".")[0] in ("comfy", "comfy_extras", "folder_paths", "nodes", "server",
                                                    "comfy_execution")})
        if name == "engine.host":
            continue
        assert not comfy, f"{name} imports {comfy}: go through engine/host.py"
