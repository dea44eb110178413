"""Stand-in for comfy.ldm.modules.diffusionmodules.openaimodel: the UNet layer classes TVE recognises."""
from torch import nn


class TimestepBlock(nn.Module):
    pass


class ResBlock(TimestepBlock):
    """The residual branch ends with ``out_layers`` (norm, SiLU, dropout, conv2), as in comfy."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.out_layers = nn.Sequential(nn.GroupNorm(1, channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(channels, channels, 3, padding=1))


class Downsample(nn.Module):
    pass


class Upsample(nn.Module):
    pass
