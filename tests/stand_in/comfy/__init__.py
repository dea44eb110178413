"""Stand-in for the few ComfyUI APIs TVE's nodes use, for host-free tests (CI has no ComfyUI).

Each module mirrors the real one's names, signatures and data layout (``model_options`` dicts, replace keys,
wrapper lists) at ComfyUI a125cd84; behaviour the nodes do not touch is left out. With ``COMFYUI_PATH`` set the
suite runs against the real host instead, which keeps this stand-in honest.
"""
