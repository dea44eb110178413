"""Names and sizes of what the e2e session sets up (shared by conftest.py and the tests)."""
PACK_FOLDER = "TVE pack.test-copy"                 # a space and a dot: not a Python identifier
CHECKPOINT = "tve_e2e_tiny_sd15.safetensors"
CONTROLNET = "tve_e2e_tiny_controlnet.safetensors"  # an SD1.5 ControlNet for that checkpoint's UNet
VIDEO = "tve_e2e_source.mp4"
RAFT_PLACEHOLDER = "tve_e2e_listed_only.pth"       # an empty file: proves the optical_flow: path reaches the node
FRAMES, HEIGHT, WIDTH, FPS = 6, 48, 64, 8          # the source video: small, and not square
