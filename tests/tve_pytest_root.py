"""pytest plugin (loaded by pytest.ini): collect the pack's root folder as a plain directory.

The root holds ComfyUI's entry point ``__init__.py``; collected as a package, pytest would import it under the
clone's folder name, which need not be a valid module name. Tests import the pack as ``tve`` (conftest.py).
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path, parent):
    if path == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
