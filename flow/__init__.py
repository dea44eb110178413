"""Host-free optical flow: estimation (RAFT, DIS), occlusion, warping, FLATTEN trajectories and previews; no ComfyUI imports."""
