"""Names and sizes of what the e2e session sets up (shared by conftest.py and the tests)."""
from dataclasses import dataclass

# A dot and hyphens: not a Python identifier. No space: ComfyUI serves web/ at /extensions/<folder> through
# aiohttp, which never matches that route when the folder name has a space, so the frontend extension would not load.
PACK_FOLDER = "TVE-pack.test-copy"
CHECKPOINT = "tve_e2e_tiny_sd15.safetensors"
CONTROLNET = "tve_e2e_tiny_controlnet.safetensors"  # an SD1.5 ControlNet for that checkpoint's UNet
RAFT_PLACEHOLDER = "tve_e2e_listed_only.pth"       # an empty file: proves the optical_flow: path reaches the node


@dataclass(frozen=True)
class SourceVideo:
    """An H.264 clip in the server's input folder."""
    file: str
    frames: int
    height: int
    width: int
    fps: int
    audio: bool                                    # an AAC track (a tone) alongside the frames
    cap: int | None = None                         # the frame cap (ImageFromBatch length) a run raises it to


# Small and not square (4:3, a multiple of 8); ordinary web footage: 16:9 at 426x240 (not a multiple of 8), with
# sound, longer than the shipped frame caps; and the most common phone/web size, 854x480 at 30 fps.
SMALL = SourceVideo("tve_e2e_source.mp4", frames=6, height=48, width=64, fps=8, audio=False)
WEB = SourceVideo("tve_e2e_426x240.mp4", frames=18, height=240, width=426, fps=12, audio=True)
PHONE = SourceVideo("tve_e2e_854x480.mp4", frames=8, height=480, width=854, fps=30, audio=False)
# A long clip, taken whole (the cap raised to its length): many frames through the workflows' frame windows.
LONG = SourceVideo("tve_e2e_long_426x240.mp4", frames=160, height=240, width=426, fps=24, audio=False, cap=160)
SOURCES = (SMALL, WEB, PHONE, LONG)
FRAMES, HEIGHT, WIDTH = SMALL.frames, SMALL.height, SMALL.width      # Text2Video-Zero's size and frame count
