"""Import helper for the benchmarks: ``import _tve`` registers the pack as package ``tve`` and offers
``_tve.real_host()``; both come from ``tools/_tve_alias.py``, shared with the tools."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from _tve_alias import real_host  # noqa: E402,F401
