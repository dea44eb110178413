"""Stand-in for comfy.utils: ProgressBar (records its updates, calls the global hook) and the safe weight loader."""
import safetensors.torch
import torch

PROGRESS_BAR_HOOK = None
updates: list = []          # (value, total) of every ProgressBar update, for tests


def set_progress_bar_global_hook(function):
    global PROGRESS_BAR_HOOK
    PROGRESS_BAR_HOOK = function


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total = total
        self.current = 0
        self.node_id = node_id
        self.hook = PROGRESS_BAR_HOOK

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        updates.append((self.current, self.total))
        if self.hook is not None:
            self.hook(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)


def load_torch_file(ckpt, safe_load=False, device=None, return_metadata=False):
    device = device or torch.device("cpu")
    if ckpt.lower().endswith((".safetensors", ".sft")):
        sd = safetensors.torch.load_file(ckpt, device=str(device))
    else:
        pl_sd = torch.load(ckpt, map_location=device, weights_only=True)
        if "state_dict" in pl_sd:
            sd = pl_sd["state_dict"]
        elif len(pl_sd) == 1:
            key = next(iter(pl_sd))
            sd = pl_sd[key] if isinstance(pl_sd[key], dict) else pl_sd
        else:
            sd = pl_sd
    return (sd, None) if return_metadata else sd
