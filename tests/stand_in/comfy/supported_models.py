"""Stand-in for comfy.supported_models: the model configs TVE edits with, as the UNet layout they carry and the
latent format (4 channels) of SD1.x, SD2.x and SDXL."""
import types


class _Config:
    unet_extra_config = {"num_heads": -1, "num_head_channels": 64}

    def __init__(self, unet_config):
        self.unet_config = dict(unet_config)
        self.unet_config.update(self.unet_extra_config)
        self.latent_format = types.SimpleNamespace(latent_channels=4)
        self.manual_cast_dtype = None

    def set_inference_dtype(self, dtype, manual_cast_dtype):
        self.unet_config["dtype"] = dtype
        self.manual_cast_dtype = manual_cast_dtype


class SD15(_Config):
    unet_extra_config = {"num_heads": 8, "num_head_channels": -1}


class SD20(_Config):
    pass


class SDXL(_Config):
    pass
