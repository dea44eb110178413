"""Stand-in for ComfyUI's ``nodes`` module: PreviewImage, as TVE's preview nodes call it (no files are written)."""


class PreviewImage:
    def save_images(self, images, filename_prefix="ComfyUI", prompt=None, extra_pnginfo=None):
        return {"ui": {"images": [{"filename": f"{filename_prefix}_{i:05}_.png", "subfolder": "", "type": "temp"}
                                  for i in range(len(images))]}}
