"""Stand-in for comfy.model_patcher.ModelPatcher: the same ``model_options`` layout, clone semantics
(``model_options`` deep-copied, the model shared) and setters the nodes call, recording every call."""
import copy

import torch


def set_model_options_patch_replace(model_options, patch, name, block_name, number, transformer_index=None):
    to = model_options["transformer_options"].copy()
    to["patches_replace"] = {k: v.copy() for k, v in to.get("patches_replace", {}).items()}
    key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
    to["patches_replace"].setdefault(name, {})[key] = patch
    model_options["transformer_options"] = to
    return model_options


class ModelPatcher:
    def __init__(self, model, load_device=torch.device("cpu"), offload_device=torch.device("cpu")):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.model_options = {"transformer_options": {}}
        self.object_patches = {}
        self.wrappers = {}
        self.attachments = {}
        self.calls = []                 # (setter, args) of every setter called on this patcher

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device)
        n.model_options = copy.deepcopy(self.model_options)
        n.object_patches = self.object_patches.copy()
        n.wrappers = {t: {k: list(v) for k, v in d.items()} for t, d in self.wrappers.items()}
        n.attachments = {k: v.on_model_patcher_clone() if hasattr(v, "on_model_patcher_clone") else v
                         for k, v in self.attachments.items()}
        return n

    def is_clone(self, other):
        return getattr(other, "model", None) is self.model

    def set_model_patch(self, patch, name):
        self.calls.append(("set_model_patch", name))
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {}).setdefault(name, []).append(patch)

    def set_model_attn1_patch(self, patch):
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn1_output_patch(self, patch):
        self.set_model_patch(patch, "attn1_output_patch")

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        self.calls.append(("set_model_patch_replace", name, block_name, number, transformer_index))
        self.model_options = set_model_options_patch_replace(self.model_options, patch, name, block_name, number,
                                                             transformer_index)

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def add_object_patch(self, name, obj):
        self.calls.append(("add_object_patch", name))
        self.object_patches[name] = obj

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        obj = self.model
        for attr in name.split("."):
            obj = obj[int(attr)] if attr.isdigit() else getattr(obj, attr)
        return obj

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.calls.append(("add_wrapper_with_key", wrapper_type, key))
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.calls.append(("remove_wrappers_with_key", wrapper_type, key))
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def get_wrappers(self, wrapper_type, key):
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def set_attachments(self, key, attachment):
        self.calls.append(("set_attachments", key))
        self.attachments[key] = attachment

    def remove_attachments(self, key):
        self.attachments.pop(key, None)

    def get_attachment(self, key):
        return self.attachments.get(key, None)
