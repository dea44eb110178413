"""What ComfyUI-Manager and the Comfy Registry install: the dependency lists agree and are all used, OpenCV is
imported only where DIS runs, and the registry archive keeps what the demo needs and leaves tests out."""
import ast
import fnmatch
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"opencv-python": "cv2"}                 # distribution → the module the pack imports


def requirement_names(lines) -> list[str]:
    return [re.split(r"[<>=!~ ;\[]", line.strip(), maxsplit=1)[0].lower() for line in lines
            if line.strip() and not line.strip().startswith("#")]


def pack_sources() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    files = [ROOT / name for name in tracked] if tracked else list(ROOT.rglob("*.py"))
    return [f for f in files if f.is_file() and not f.relative_to(ROOT).parts[0] in ("tests", "bench", ".venv")]


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(top-level module, enclosing function names) of every import statement in ``path``."""
    found = []

    def visit(node, scope):
        for child in ast.iter_child_nodes(node):
            inner = scope + [child.name] if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else scope
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], scope) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
                found.append((child.module.split(".")[0], scope))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), [])
    return found


def test_pyproject_and_requirements_list_the_same_dependencies_and_each_is_imported():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    listed = requirement_names(project["dependencies"])
    assert listed == requirement_names((ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines())
    used = {module for path in pack_sources() for module, _ in imports(path)}
    for name in listed:
        assert IMPORT_NAMES.get(name, name) in used, f"{name} is listed but never imported"


def test_opencv_is_imported_only_where_dis_runs():
    places = [(path.relative_to(ROOT).as_posix(), scope) for path in pack_sources()
              for module, scope in imports(path) if module == "cv2"]
    assert places == [("flow/estimate.py", ["opencv"])]


def test_without_a_working_opencv_every_node_loads_and_dis_says_what_is_missing():
    probe = f"""
import sys
sys.modules["cv2"] = None                                     # what a broken or missing OpenCV looks like
sys.path[:0] = [{str(ROOT / "tests")!r}, {str(ROOT / "tests" / "stand_in")!r}]
import conftest
from tve.nodes import NODE_CLASS_MAPPINGS
import torch
from tve.flow.estimate import estimate_flow
try:
    estimate_flow(torch.rand(2, 32, 32, 3), "dis")
except RuntimeError as error:
    print(len(NODE_CLASS_MAPPINGS), error)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "COMFYUI_PATH"}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    count, message = run.stdout.strip().split(" ", 1)
    assert int(count) >= 12 and message.startswith("method: 'dis' needs OpenCV")


def registry_archive() -> set[str]:
    """The files `comfy node publish` zips: git-tracked files minus .comfyignore (gitwildmatch; the patterns used
    here are folder prefixes 'dir/' and plain names)."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    patterns = [line.strip() for line in (ROOT / ".comfyignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[\w./-]+", p) for p in patterns), "keep .comfyignore to folders and file names"

    def ignored(name: str) -> bool:
        for pattern in patterns:
            if pattern.endswith("/") and (name.startswith(pattern) or f"/{pattern}" in f"/{name}"):
                return True
            if not pattern.endswith("/") and (fnmatch.fnmatch(name, pattern) or name.endswith("/" + pattern)):
                return True
        return False

    return {name for name in tracked if not ignored(name)}


def pack_modules_imported_by(path: Path, seen: set[Path]) -> set[Path]:
    """``path`` and every pack file it imports (``tve.…``, relative, or a sibling in tools/), transitively."""
    if path in seen or not path.is_file():
        return seen
    seen.add(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom):
            base = path.parent
            for _ in range(max(0, node.level - 1)):
                base = base.parent
            if node.level:
                names.append((base, (node.module or "").split(".") if node.module else []))
                names += [(base, [*((node.module or "").split(".") if node.module else []), a.name]) for a in node.names]
            elif node.module and node.module.split(".")[0] == "tve":
                parts = node.module.split(".")[1:]
                names += [(ROOT, parts)] + [(ROOT, parts + [a.name]) for a in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "tve":
                    names.append((ROOT, parts[1:]))
                elif (path.parent / f"{parts[0]}.py").is_file():
                    names.append((path.parent, parts))
        for base, parts in names:
            target = base.joinpath(*parts)
            for candidate in (target.with_suffix(".py"), target / "__init__.py"):
                pack_modules_imported_by(candidate, seen)
    return seen


def test_registry_archive_keeps_the_demo_and_what_it_uses_and_leaves_tests_benchmarks_and_ci_out():
    archive = registry_archive()
    needed = {p.relative_to(ROOT).as_posix() for p in pack_modules_imported_by(ROOT / "tools" / "demo.py", set())}
    needed |= {"tools/test_model/unet.safetensors", "tools/test_model/conditioning.safetensors", "__init__.py",
               "pyproject.toml", "requirements.txt", "LICENSE", "README.md"}
    assert "tools/video_world.py" in needed and "engine/tokenflow.py" in needed    # the closure is really walked
    assert not needed - archive, f"missing from the registry archive: {sorted(needed - archive)}"
    assert not [name for name in archive if name.split("/")[0] in ("tests", "bench", ".ci")]
    assert any(name.startswith("workflows/") for name in archive) and any(name.startswith("web/") for name in archive)
