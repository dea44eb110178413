"""Host-free attention math: tensors in, tensors out; no ComfyUI imports."""
