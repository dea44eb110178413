"""Stand-in for comfy.model_base: a BaseModel holding the stand-in UNet of its config's layout, its config, model
type and latent format (what the host adapter reads)."""
import enum

from torch import nn

from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel


class ModelType(enum.Enum):
    EPS = 1
    V_PREDICTION = 2


class BaseModel(nn.Module):
    def __init__(self, model_config, model_type=ModelType.EPS, device=None):
        super().__init__()
        self.model_config = model_config
        self.model_type = model_type
        self.latent_format = model_config.latent_format
        self.diffusion_model = UNetModel(**model_config.unet_config)


class SDXL(BaseModel):
    pass
