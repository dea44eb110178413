"""One headless ComfyUI per session, with this pack loaded from a folder with an awkward name, a generated SD1.5
checkpoint and a procedural source video (needs COMFYUI_PATH; the tests are ``real_host``)."""
from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from tve.tests.e2e.headless_comfyui import HeadlessComfyUI, start
from tve.tests.e2e.session_files import CHECKPOINT, CONTROLNET, PACK_FOLDER, RAFT_PLACEHOLDER, SOURCES, SourceVideo
from tve.tests.e2e.tiny_sd15 import write_tiny_controlnet, write_tiny_sd15
from tve.tools.video_world import render_clip

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("comfyui_e2e")


@pytest.fixture(scope="session")
def checkpoint_file(e2e_root) -> Path:
    folder = e2e_root / "models" / "checkpoints"
    folder.mkdir(parents=True)
    return write_tiny_sd15(folder / CHECKPOINT, seed=0)


@pytest.fixture(scope="session")
def controlnet_file(e2e_root) -> Path:
    folder = e2e_root / "models" / "controlnet"
    folder.mkdir(parents=True)
    return write_tiny_controlnet(folder / CONTROLNET, seed=1)


AUDIO_RATE = 16000


def write_source_video(path: Path, source: SourceVideo) -> Path:
    """``source.frames`` frames of a seeded procedural clip as H.264 (and a 440 Hz tone as AAC if ``audio``)."""
    import av
    frames = render_clip(source.frames, source.height, source.width, seed=3).frames
    pixels = (frames.numpy() * 255).round().astype(np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(source.fps))
        stream.width, stream.height, stream.pix_fmt = source.width, source.height, "yuv420p"
        sound = None
        if source.audio:
            sound = container.add_stream("aac", rate=AUDIO_RATE)
            seconds = source.frames / source.fps
            t = np.arange(int(seconds * AUDIO_RATE)) / AUDIO_RATE
            tone = av.AudioFrame.from_ndarray((0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None],
                                              format="fltp", layout="mono")
            tone.sample_rate = AUDIO_RATE
            for packet in sound.encode(tone):
                container.mux(packet)
        for frame in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
        if sound is not None:
            container.mux(sound.encode(None))
    return path


@pytest.fixture(scope="session")
def source_videos(e2e_root) -> list[Path]:
    folder = e2e_root / "base" / "input"
    folder.mkdir(parents=True)
    return [write_source_video(folder / source.file, source) for source in SOURCES]


@pytest.fixture(scope="session")
def comfyui(e2e_root, checkpoint_file, controlnet_file, source_videos) -> HeadlessComfyUI:
    """The server: ``--base-directory`` for input/output/temp/user, extra_model_paths.yaml for the pack's
    custom_nodes folder, the checkpoint, the ControlNet and optical_flow; only this pack is allowed to load."""
    comfyui_path = Path(os.environ["COMFYUI_PATH"]).resolve()
    base = e2e_root / "base"
    (base / "custom_nodes").mkdir()                  # ComfyUI lists its own custom_nodes folder: keep it empty
    custom_nodes = e2e_root / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
    flow_folder = e2e_root / "models" / "optical_flow"
    flow_folder.mkdir(parents=True)
    (flow_folder / RAFT_PLACEHOLDER).write_bytes(b"")
    config = e2e_root / "extra_model_paths.yaml"
    paths = {"custom_nodes": custom_nodes, "checkpoints": checkpoint_file.parent, "controlnet": controlnet_file.parent,
             "optical_flow": flow_folder}
    config.write_text("tve_e2e:\n" + "".join(f"    {key}: {json.dumps(str(path))}\n" for key, path in paths.items()),
                      encoding="utf-8")
    server = start(comfyui_path, ["--base-directory", str(base), "--extra-model-paths-config",
                                  str(config), "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
                                  "--disable-all-custom-nodes", "--whitelist-custom-nodes", PACK_FOLDER],
                   e2e_root / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def object_info(comfyui) -> dict:
    return comfyui.get("/object_info").json()
