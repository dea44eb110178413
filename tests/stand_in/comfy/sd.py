"""Stand-in for comfy.sd: an SD-family VAE (factor 8, whatever state dict it is given) with the crop rule of
``VAE.vae_encode_crop_pixels`` and no weights."""


class VAE:
    def __init__(self, sd=None, downscale_ratio: int = 8):
        self.downscale_ratio = downscale_ratio
        self.crop_input = True

    def spacial_compression_encode(self) -> int:
        return self.downscale_ratio

    def vae_encode_crop_pixels(self, pixels):
        ratio = self.spacial_compression_encode()
        for d, size in enumerate(pixels.shape[1:-1]):
            x = (size // ratio) * ratio
            if x != size:
                pixels = pixels.narrow(d + 1, (size % ratio) // 2, x)
        return pixels
