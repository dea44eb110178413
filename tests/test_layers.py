"""The pack's layers, read from its source: no import circle anywhere, the engine never imports the node classes,
the host-free packages import no ComfyUI and nothing above them, and only the host adapter imports comfy
internals (the node classes import ComfyUI's public node schema, ``comfy_api.latest``, and nothing else of it).
The tests reach the host only through the host adapter too (issue 21): a core refactor then breaks a test only where
it breaks the pack."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attention", "flow", "engine", "nodes")
# ComfyUI's top-level modules and packages (a custom node pack shares its interpreter)
COMFYUI = ("comfy", "comfy_extras", "comfy_api", "comfy_api_nodes", "comfy_config", "comfy_execution",
           "comfyui_version", "folder_paths", "nodes", "node_helpers", "server", "execution", "latent_preview")
# What the node classes import of ComfyUI: its public V3 node schema (``io.ComfyNode``, ``io.Schema``, ...)
NODE_API = ["comfy_api.latest"]
# Test files that import ComfyUI themselves, each module with the reason it does not go through engine/host.py.
TEST_IMPORTS_ALLOWED = {
    # the stand-in-only check of which ``comfy`` package the harness put first on sys.path: it reads the package's
    # file name, nothing inside it, and the host adapter would only hand the same package back
    ("test_pack_loading.py", "comfy"): "which comfy the suite runs against",
    # the e2e harness's checkpoint writer (another work item owns tests/e2e's harness files): it builds comfy's SD1.5
    # UNet, CLIP-L, VAE and cldm ControlNet on the meta device for the names and shapes of the files it writes
    ("e2e/tiny_sd15.py", "comfy.sd"): "e2e checkpoint layout",
    ("e2e/tiny_sd15.py", "comfy.sd1_clip"): "e2e checkpoint layout",
    ("e2e/tiny_sd15.py", "comfy.supported_models"): "e2e checkpoint layout",
    ("e2e/tiny_sd15.py", "comfy.cldm.cldm"): "e2e ControlNet file layout",
    ("e2e/tiny_sd15.py", "comfy.ops"): "e2e ControlNet file layout",
}


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
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            found.append((node.args[0].value, False))       # importlib.import_module("comfy.sd"), __import__(...)
        elif isinstance(node, ast.Import):
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


def comfyui_imports(path: Path) -> list[str]:
    return sorted({module for module, ours in runtime_imports(path) if not ours and module.split(".")[0] in COMFYUI})


def test_only_the_host_adapter_imports_comfy_internals_and_nodes_import_only_the_public_node_api():
    for name, path in modules().items():
        comfy = comfyui_imports(path)
        if name == "engine.host":
            continue
        allowed = NODE_API if name.startswith("nodes.") else []
        assert not set(comfy) - set(allowed), f"{name} imports {comfy}: go through engine/host.py"


def suite_files() -> list[Path]:
    """Every Python file of tests/ (the harness, helpers and e2e included) but the stand-in host."""
    tests = ROOT / "tests"
    return sorted(p for p in tests.rglob("*.py") if (tests / "stand_in") not in p.parents)


def test_no_test_imports_comfyui_but_through_the_host_adapter():
    found = {}
    for path in suite_files():
        name = path.relative_to(ROOT / "tests").as_posix()
        imported = [m for m in comfyui_imports(path) if (name, m) not in TEST_IMPORTS_ALLOWED]
        if imported:
            found[name] = imported
    assert not found, f"tests import ComfyUI {found}: reach it through tve.engine.host (a function of the host " \
                      "adapter, a core node through host.run_core_node, or a wrapper, patch or callback on a MODEL)"


def test_the_allowed_imports_are_still_there():
    stale = [key for key in TEST_IMPORTS_ALLOWED if key[1] not in comfyui_imports(ROOT / "tests" / key[0])]
    assert not stale, f"TEST_IMPORTS_ALLOWED lists imports no test makes any more: {stale}"


def test_the_import_check_finds_every_form_of_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import comfy.sd\nfrom comfy_extras.nodes_train import BiasDiff\nimport folder_paths as fp\n"
                     "def f():\n    from nodes import KSampler\n    import importlib\n"
                     "    importlib.import_module('comfy_api.latest')\n    __import__('server')\n"
                     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import latent_preview\n"
                     "import tve.engine.host\n")
    assert comfyui_imports(probe) == ["comfy.sd", "comfy_api.latest", "comfy_extras.nodes_train", "folder_paths",
                                      "nodes", "server"]
