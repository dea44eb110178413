"""The one-command demo (tools/demo.py) on the real host: it writes the labelled side-by-side video, the strip and
the consistency figures of every method, saying what it does as it goes, from the bundled test model alone."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_host

ROOT = Path(__file__).resolve().parents[1]
PANELS = ("source", "per-frame PnP", "TokenFlow", "FLATTEN")


def test_demo_writes_the_four_panel_video_strip_and_figures(tmp_path):
    import av
    out = tmp_path / "demo out"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--frames", "3", "--steps", "2",
                          "--scale", "1", "--out", str(out)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "COMFYUI_PATH": os.environ["COMFYUI_PATH"]}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "TVE demo" in run.stderr and "8/8" in run.stderr      # the steps of inversion + 3 edits × 2 steps
    with av.open(str(out / "demo.mp4")) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(frames) == 3
    assert frames[0].shape == (12 + 128, 4 * 128, 3)                           # title bar over four 128-px panels
    report = json.loads((out / "figures.json").read_text(encoding="utf-8"))
    assert list(report["methods"]) == list(PANELS)
    for name, row in report["methods"].items():
        assert row["warp_error_x1000"] >= 0 and row["flicker"] >= 0, name
    assert report["methods"]["per-frame PnP"]["warp_vs_per_frame"] == pytest.approx(1.0)
    assert report["methods"]["source"]["warp_error_x1000"] < report["methods"]["per-frame PnP"]["warp_error_x1000"]
    from PIL import Image
    with Image.open(out / "strip.png") as strip:
        assert strip.size == (3 * 128, 4 * (12 + 128))
    assert all(name in run.stdout for name in PANELS)


def test_demo_says_what_it_does_before_the_first_model_evaluation(tmp_path, monkeypatch, capsys):
    """In-process, stopped at the first call of the UNet: by then stderr has named every phase so far, the
    inversion included (a user must never wait in silence for the slow part)."""
    import importlib.util

    import torch

    from tve.tools import train_test_model
    spec = importlib.util.spec_from_file_location("tve_demo_script", ROOT / "tools" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)

    class FirstEvaluation(Exception):
        pass

    said, hooks, real_load = [], [], train_test_model.load

    def load_watched(folder):
        model, conditioning = real_load(folder)

        def stop(module, args):
            said.append(capsys.readouterr().err)
            raise FirstEvaluation

        hooks.append(model.model.diffusion_model.register_forward_pre_hook(stop))
        return model, conditioning

    monkeypatch.setattr(train_test_model, "load", load_watched)
    monkeypatch.setattr(sys, "argv", ["demo.py", "--frames", "2", "--steps", "2", "--out", str(tmp_path)])
    try:
        with torch.random.fork_rng(), pytest.raises(FirstEvaluation):
            demo.main()
    finally:
        for hook in hooks:
            hook.remove()
    assert len(said) == 1
    lines = said[0].splitlines()
    assert lines[0].startswith("TVE demo [") and "2 frames of 128x128, 2 steps" in lines[0]
    phases = ("loading ComfyUI", "rendering the held-out clip", "loading the test model", "DDIM inversion, 2 steps")
    for phase in phases:
        assert any(phase in line for line in lines), (phase, lines)
    assert lines[-1].endswith("DDIM inversion, 2 steps ...")


def test_demo_refuses_a_clip_of_one_frame(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--frames", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert run.returncode == 2 and "--frames and --steps must be at least 2" in run.stderr
