"""Stand-in for comfy.ldm.modules.diffusionmodules.openaimodel: the UNet layer classes TVE recognises, and a UNet
with the real one's block layout (input/middle/output blocks, where the SpatialTransformers, Downsamples and
Upsamples sit) for a layout's arguments; it computes nothing."""
from torch import nn


class TimestepBlock(nn.Module):
    pass


class ResBlock(TimestepBlock):
    """The residual branch: ``in_layers`` (norm, SiLU, conv1) and ``out_layers`` (norm, SiLU, dropout, conv2), as in
    comfy."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(1, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        self.out_layers = nn.Sequential(nn.GroupNorm(1, channels), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(channels, channels, 3, padding=1))


class Downsample(nn.Module):
    pass


class Upsample(nn.Module):
    pass


class UNetModel(nn.Module):
    def __init__(self, model_channels, channel_mult, num_res_blocks, transformer_depth, transformer_depth_middle,
                 transformer_depth_output, num_head_channels=-1, num_heads=-1, **unused):
        super().__init__()
        from comfy.ldm.modules.attention import SpatialTransformer

        depth_out = list(transformer_depth_output)
        channels = [model_channels * m for m in channel_mult]

        def spatial(ch: int, depth: int) -> list:
            heads = num_heads if num_head_channels == -1 else ch // num_head_channels
            return [SpatialTransformer(ch, heads, ch // heads, depth)] if depth else []

        inputs = [nn.Sequential(ResBlock())]
        for level, ch in enumerate(channels):
            inputs.append(nn.Sequential(ResBlock(), *spatial(ch, transformer_depth[level])))
            if level < len(channels) - 1:
                inputs.append(nn.Sequential(Downsample()))
        self.input_blocks = nn.ModuleList(inputs)
        self.middle_block = nn.Sequential(ResBlock(), *spatial(channels[-1], transformer_depth_middle), ResBlock())
        outputs = []
        for level in reversed(range(len(channels))):
            for i in range(num_res_blocks[level] + 1):
                layers = [ResBlock(), *spatial(channels[level], depth_out.pop())]
                if level and i == num_res_blocks[level]:
                    layers.append(Upsample())
                outputs.append(nn.Sequential(*layers))
        self.output_blocks = nn.ModuleList(outputs)
        self.out = nn.Sequential(nn.GroupNorm(1, 4), nn.SiLU(), nn.Conv2d(4, 4, 3, padding=1))   # the output norm
