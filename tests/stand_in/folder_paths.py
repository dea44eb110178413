"""Stand-in for ComfyUI's folder_paths: model folders under ``TVE_STAND_IN_MODELS`` (a temp dir in tests)."""
import os
import tempfile

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
base_path = os.environ.get("TVE_STAND_IN_MODELS") or tempfile.mkdtemp(prefix="tve_stand_in_")
models_dir = os.path.join(base_path, "models")
folder_names_and_paths = {"checkpoints": ([os.path.join(models_dir, "checkpoints")], supported_pt_extensions)}


def get_folder_paths(folder_name):
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name):
    paths, exts = folder_names_and_paths[folder_name]
    names = set()
    for base in paths:
        for root, _, files in os.walk(base, followlinks=True):
            for f in files:
                if not exts or os.path.splitext(f)[1].lower() in exts:
                    names.add(os.path.relpath(os.path.join(root, f), base))
    return sorted(names)


def get_full_path(folder_name, filename):
    for base in folder_names_and_paths[folder_name][0]:
        path = os.path.join(base, os.path.normpath(filename))
        if os.path.isfile(path):
            return path
    return None
