"""Seeded procedural video world with exact optical flow, for tests and benchmarks of the pack.

A scene is a stack of layers: a textured background seen through a camera (translation, zoom, rotation)
and up to three textured sprites (ellipses or rounded rectangles) with their own affine motion, composited
by depth (the last sprite is on top). Every layer has a continuous analytic texture in its own layer
coordinates ``u`` (reference pixels, 64 of them across the shorter image side) and one affine map per frame,
``p = A_t u`` (3x3 homogeneous, layer -> image pixels; pixel centres at integer ``(x, y)``, x right, y down).

Rendering maps each pixel centre back, ``u = A_t^-1 p``, and evaluates the texture there analytically: no
raster is resampled, so sub-pixel motion is exact. The texture is ``0.5 + 0.5 tanh(base + sum_k c_k
sin(2 pi f_k . u + phi_k))`` with 16 coloured waves of period 8..64 reference pixels; waves whose on-screen
period would fall near 4 px (small renders) are faded out so nothing aliases. Sprite shapes are hard masks.

Ground truth for the pair ``(t, t+1)``, with ``L`` the topmost layer whose shape holds ``A_t^-1 p``:
    forward flow        ``A_{t+1} A_t^-1 p - p``  (per owning layer ``L``)
    forward occlusion   the landing point ``q = p + flow`` leaves the image area ``[-0.5, W - 0.5) x
                        [-0.5, H - 0.5)``, or the topmost layer at ``q`` in frame ``t+1`` is not ``L``
The backward flow and occlusion are the same from ``t+1`` to ``t``. Owners at ``q`` are evaluated exactly
(sub-pixel), so the definitions match the renderer.

Motion is given in reference pixels and scaled with the image: the same seed at 256x256 moves four times as
many pixels as at 64x64. All random draws happen in a fixed order whatever the camera mode, sprite count or
size, so one seed keeps its textures and sprites across them.

Test latent space (a stand-in for a VAE): ``frames_to_latent`` averages 8x8 pixel cells and applies the
fixed, well-conditioned affine map ``latent = LATENT_FROM_RGB @ rgb + LATENT_BIAS`` (2-norm condition
number 1.12); ``latent_to_frames`` applies its pseudo-inverse, clamps to [0, 1] and repeats each cell over 8x8
pixels, so ``frames_to_latent(latent_to_frames(z)) == z`` for every ``z`` in the image of [0, 1]^3.
The map is scaled like a real SD VAE: raw latents are what VAEEncode returns, and the model-space latents
comfy feeds the UNet (raw x 0.18215, the SD1.5 latent format's ``process_latent_in``) have mean ~0 and
standard deviation ~1 over the world's frames (per channel 0.87..1.15).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf

REFERENCE_SIZE = 64  # reference pixels across the shorter image side
CAMERAS = ("static", "translate", "zoom", "rotate", "random")
MAX_SPRITES = 3
LATENT_SCALE = 8  # pixels per latent cell, each way

_LATENT_GAIN = 19.0  # model-space latents (raw x 0.18215) of the world's frames get a standard deviation ~1
LATENT_FROM_RGB = _LATENT_GAIN * torch.tensor(
    [[0.9, 0.3, -0.2],
     [-0.4, 0.8, 0.5],
     [0.3, -0.6, 0.9],
     [0.5, 0.5, 0.5]], dtype=torch.float64)  # (4, 3)
LATENT_BIAS = _LATENT_GAIN * torch.tensor([-0.5, -0.45, -0.3, -0.75], dtype=torch.float64)  # (4,) centres them
RGB_FROM_LATENT = torch.linalg.pinv(LATENT_FROM_RGB)  # (3, 4)

_WAVES = 16
_PERIOD_RANGE = (8.0, 64.0)  # reference pixels
_FADE_PERIOD_PX = 4.0  # waves fade out as their on-screen period approaches this
_ZOOM_LIMIT = 0.25  # |log zoom| of the camera stays below this
_SPRITE_BREATH = 0.1  # sprites scale by exp(+-0.1) over their breathing cycle
_SPRITE_MARGIN = 6.0  # sprite centres stay this far (reference px) inside the frame


@dataclass(frozen=True)
class Clip:
    frames: torch.Tensor  # (F, H, W, 3) float in [0, 1]  (ComfyUI IMAGE layout)
    flow_forward: torch.Tensor  # (F-1, 2, H, W) float32, pixels (dx, dy), frame t -> t+1
    flow_backward: torch.Tensor  # (F-1, 2, H, W) float32, frame t+1 -> t
    occlusion_forward: torch.Tensor  # (F-1, H, W) bool, frame t pixel not visible in t+1
    occlusion_backward: torch.Tensor  # (F-1, H, W) bool, frame t+1 pixel not visible in t


@dataclass(frozen=True)
class _Texture:
    frequency: torch.Tensor  # (K, 2) cycles per reference pixel
    phase: torch.Tensor  # (K,)
    colour: torch.Tensor  # (K, 3)
    base: torch.Tensor  # (3,)


@dataclass(frozen=True)
class _Shape:
    ellipse: bool  # else a rounded rectangle
    half_size: tuple[float, float]  # reference pixels
    corner: float  # corner radius of the rounded rectangle


@dataclass(frozen=True)
class _Layer:
    texture: _Texture
    shape: _Shape | None  # None: fills the plane (background)
    maps: torch.Tensor  # (F, 3, 3) float64, layer -> image pixels


@dataclass(frozen=True)
class _SpriteDraw:
    texture: _Texture
    shape: _Shape
    start: torch.Tensor  # (2,) in [-1, 1], fraction of the bounce box
    velocity: torch.Tensor  # (2,) reference px per frame
    angle: float  # radians
    spin: float  # radians per frame
    breath_period: float  # frames
    breath_phase: float  # radians


def _uniform(gen: torch.Generator, low: float, high: float, *size: int) -> torch.Tensor:
    return low + (high - low) * torch.rand(size, generator=gen, dtype=torch.float64)


def _sign(gen: torch.Generator) -> float:
    return 1.0 if torch.rand((), generator=gen).item() < 0.5 else -1.0


def _direction(gen: torch.Generator) -> torch.Tensor:
    angle = _uniform(gen, 0.0, 2 * math.pi, 1)
    return torch.cat([angle.cos(), angle.sin()])  # (2,)


def _draw_texture(gen: torch.Generator) -> _Texture:
    period = torch.exp(_uniform(gen, math.log(_PERIOD_RANGE[0]), math.log(_PERIOD_RANGE[1]), _WAVES))
    angle = _uniform(gen, 0.0, 2 * math.pi, _WAVES)
    frequency = torch.stack([angle.cos(), angle.sin()], dim=-1) / period[:, None]
    phase = _uniform(gen, 0.0, 2 * math.pi, _WAVES)
    colour = torch.randn(_WAVES, 3, generator=gen, dtype=torch.float64) * math.sqrt(2.0 / _WAVES)
    base = _uniform(gen, -0.6, 0.6, 3)
    return _Texture(frequency, phase, colour, base)


def _draw_sprite(gen: torch.Generator) -> _SpriteDraw:
    texture = _draw_texture(gen)
    ellipse = _sign(gen) > 0
    half_size = _uniform(gen, 8.0, 16.0, 2)
    corner = _uniform(gen, 0.2, 0.5, 1).item() * half_size.min().item()
    shape = _Shape(ellipse, (half_size[0].item(), half_size[1].item()), corner)
    start = _uniform(gen, -0.8, 0.8, 2)
    velocity = _direction(gen) * _uniform(gen, 1.0, 2.5, 1)
    angle = _uniform(gen, 0.0, 2 * math.pi, 1).item()
    spin = _sign(gen) * math.radians(_uniform(gen, 1.0, 4.0, 1).item())
    breath_period = _uniform(gen, 10.0, 20.0, 1).item()
    breath_phase = _uniform(gen, 0.0, 2 * math.pi, 1).item()
    return _SpriteDraw(texture, shape, start, velocity, angle, spin, breath_period, breath_phase)


def _triangle(x: torch.Tensor) -> torch.Tensor:
    """Triangle wave of period 4 with values in [-1, 1], slope +1 through the origin."""
    return 1.0 - ((x + 1.0).remainder(4.0) - 2.0).abs()


def _rotation_scale(angle: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(F,) angles (radians, clockwise on screen) and scales -> (F, 2, 2) matrices ``scale * R(angle)``."""
    cos, sin = angle.cos() * scale, angle.sin() * scale
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)


def _affine(linear: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """(F, 2, 2) linear parts and (F, 2) offsets -> (F, 3, 3) homogeneous maps."""
    maps = torch.zeros(linear.shape[0], 3, 3, dtype=torch.float64)
    maps[:, :2, :2] = linear
    maps[:, :2, 2] = offset
    maps[:, 2, 2] = 1.0
    return maps


def _camera_maps(times: torch.Tensor, height: int, width: int, shift: torch.Tensor, angle: torch.Tensor,
                 log_zoom: torch.Tensor) -> torch.Tensor:
    """Background maps ``p = c + scale (zoom_t R(angle_t) u + shift_t)``, all (F, ...) -> (F, 3, 3).

    ``c`` is the image centre, ``shift_t`` (F, 2) is in reference px, so the content moves by ``scale *
    (shift_{t+1} - shift_t)`` pixels when there is no rotation or zoom."""
    scale = min(height, width) / REFERENCE_SIZE
    centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=torch.float64)
    linear = _rotation_scale(angle, scale * log_zoom.exp())
    return _affine(linear, centre + scale * shift.expand(times.shape[0], 2))


def _sprite_maps(sprite: _SpriteDraw, times: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Image-space sprite motion: the centre bounces inside the frame, the sprite spins and breathes."""
    scale = min(height, width) / REFERENCE_SIZE
    centre = torch.tensor([(width - 1) / 2, (height - 1) / 2], dtype=torch.float64)
    box = torch.tensor([width, height], dtype=torch.float64) / (2 * scale) - _SPRITE_MARGIN
    box = box.clamp(min=1.0)  # (2,) half size of the bounce box, reference px
    position = box * _triangle(sprite.start + times[:, None] * sprite.velocity / box)  # (F, 2)
    angle = sprite.angle + sprite.spin * times
    breath = _SPRITE_BREATH * torch.sin(2 * math.pi * times / sprite.breath_period + sprite.breath_phase)
    linear = _rotation_scale(angle, scale * breath.exp())
    return _affine(linear, centre + scale * position)


def _apply(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """One (3, 3) affine applied to points (..., 2)."""
    return points @ maps[:2, :2].T + maps[:2, 2]


def _texture_colour(texture: _Texture, u: torch.Tensor, fade: torch.Tensor) -> torch.Tensor:
    """Texture at layer coordinates u (N, 2) -> (N, 3); ``fade`` (K,) anti-alias weights."""
    waves = torch.sin(2 * math.pi * (u @ texture.frequency.T) + texture.phase)  # (N, K)
    return 0.5 + 0.5 * torch.tanh(texture.base + waves @ (fade[:, None] * texture.colour))


def _inside(shape: _Shape, u: torch.Tensor) -> torch.Tensor:
    """Whether layer coordinates u (..., 2) lie in the shape -> (...) bool."""
    a, b = shape.half_size
    x, y = u[..., 0].abs(), u[..., 1].abs()
    if shape.ellipse:
        return (x / a) ** 2 + (y / b) ** 2 <= 1.0
    r = shape.corner
    qx, qy = (x - (a - r)).clamp(min=0.0), (y - (b - r)).clamp(min=0.0)
    return (x <= a) & (y <= b) & (qx ** 2 + qy ** 2 <= r ** 2)


def _owner(layers: list[_Layer], inverse: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Topmost layer index at image points (..., 2) for one frame; ``inverse`` (L, 3, 3) -> (...) long."""
    owner = torch.zeros(points.shape[:-1], dtype=torch.long)
    for index in range(1, len(layers)):
        owner[_inside(layers[index].shape, _apply(inverse[index], points))] = index
    return owner


def _outside(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    x, y = points[..., 0], points[..., 1]
    return (x < -0.5) | (x >= width - 0.5) | (y < -0.5) | (y >= height - 0.5)


def _render(layers: list[_Layer], frames: int, height: int, width: int, dtype: torch.dtype) -> Clip:
    scale = min(height, width) / REFERENCE_SIZE
    min_pixels_per_unit = scale * math.exp(-max(_ZOOM_LIMIT, _SPRITE_BREATH))
    maps = torch.stack([layer.maps for layer in layers])  # (L, F, 3, 3)
    inverse = torch.linalg.inv(maps)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64),
                            torch.arange(width, dtype=torch.float64), indexing="ij")
    pixels = torch.stack([xs, ys], dim=-1)  # (H, W, 2)
    fades = [torch.exp(-(_FADE_PERIOD_PX * layer.texture.frequency.norm(dim=-1) / min_pixels_per_unit) ** 4)
             for layer in layers]  # (K,) each

    def transfer(owner: torch.Tensor, u: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow (2, H, W) and occlusion (H, W) of the pixels owned by ``owner`` (H, W), at layer coordinates
        ``u`` (H, W, 2), seen in frame ``target``."""
        landing = maps[:, target][owner]  # (H, W, 3, 3)
        q = (landing[..., :2, :2] @ u[..., None])[..., 0] + landing[..., :2, 2]  # (H, W, 2)
        occluded = _outside(q, height, width) | (_owner(layers, inverse[:, target], q) != owner)
        return (q - pixels).permute(2, 0, 1).float(), occluded

    images, forward, backward = [], [], []
    previous = None                      # (owner, u) of frame t-1
    for t in range(frames):
        coords = torch.stack([_apply(inverse[index, t], pixels) for index in range(len(layers))])  # (L, H, W, 2)
        owner = _owner(layers, inverse[:, t], pixels)  # (H, W)
        u = coords.gather(0, owner[None, :, :, None].expand(1, height, width, 2))[0]  # (H, W, 2)
        image = torch.empty(height, width, 3, dtype=torch.float64)
        for index, layer in enumerate(layers):
            mine = owner == index
            image[mine] = _texture_colour(layer.texture, u[mine], fades[index])
        images.append(image.to(dtype))
        if t > 0:
            forward.append(transfer(*previous, t))
            backward.append(transfer(owner, u, t - 1))
        previous = owner, u

    empty_flow = torch.zeros(0, 2, height, width)
    empty_mask = torch.zeros(0, height, width, dtype=torch.bool)
    return Clip(
        frames=torch.stack(images),
        flow_forward=torch.stack([f for f, _ in forward]) if forward else empty_flow,
        flow_backward=torch.stack([f for f, _ in backward]) if backward else empty_flow,
        occlusion_forward=torch.stack([o for _, o in forward]) if forward else empty_mask,
        occlusion_backward=torch.stack([o for _, o in backward]) if backward else empty_mask,
    )


def _check_size(frames: int, height: int, width: int) -> None:
    if frames < 1:
        raise ValueError(f"frames must be at least 1, got {frames}")
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be at least 1, got {height}x{width}")


def render_clip(frames: int = 8, height: int = 64, width: int = 64, seed: int = 0, *,
                camera: str = "random", sprites: int = 2, speed: float = 1.0,
                dtype: torch.dtype = torch.float32) -> Clip:
    """A layered clip: a background under a camera motion plus ``sprites`` occluding sprites.

    ``camera``: "static", "translate" (1.5-3 reference px/frame), "zoom" (3-5 %/frame, bouncing within
    exp(+-0.25)), "rotate" (2-4 deg/frame about the centre) or "random" (all three: 50-100 % of that pan,
    up to 50 % of that zoom and spin). Sprites move 1-2.5 reference px/frame, bouncing inside the frame,
    spin 1-4 deg/frame and breathe by +-10 %.
    ``speed`` scales time for every motion (0 gives a still clip). A reference px is 1/64 of the shorter
    image side. The frames have ``dtype``; the flows are float32, the occlusions bool.
    """
    _check_size(frames, height, width)
    if camera not in CAMERAS:
        raise ValueError(f"camera must be one of {CAMERAS}, got {camera!r}")
    if not 0 <= sprites <= MAX_SPRITES:
        raise ValueError(f"sprites must be in 0..{MAX_SPRITES}, got {sprites}")
    if not (math.isfinite(speed) and speed >= 0):
        raise ValueError(f"speed must be a finite number >= 0, got {speed}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point dtype, got {dtype}")

    gen = torch.Generator().manual_seed(seed)
    background = _draw_texture(gen)
    pan = _direction(gen) * _uniform(gen, 1.5, 3.0, 1)  # (2,) reference px per frame
    zoom = _sign(gen) * _uniform(gen, 0.03, 0.05, 1).item()  # log zoom per frame
    spin = _sign(gen) * math.radians(_uniform(gen, 2.0, 4.0, 1).item())  # radians per frame
    mild = _uniform(gen, 0.0, 1.0, 3)  # fractions used by the "random" camera
    sprite_draws = [_draw_sprite(gen) for _ in range(MAX_SPRITES)]

    times = torch.arange(frames, dtype=torch.float64) * speed
    pan_rate, zoom_rate, spin_rate = {
        "static": (0.0, 0.0, 0.0),
        "translate": (1.0, 0.0, 0.0),
        "zoom": (0.0, 1.0, 0.0),
        "rotate": (0.0, 0.0, 1.0),
        "random": (0.5 + 0.5 * mild[0].item(), 0.5 * mild[1].item(), 0.5 * mild[2].item()),
    }[camera]
    log_zoom = _ZOOM_LIMIT * _triangle(times * zoom * zoom_rate / _ZOOM_LIMIT)
    camera_maps = _camera_maps(times, height, width, times[:, None] * pan * pan_rate,
                               times * spin * spin_rate, log_zoom)
    layers = [_Layer(background, None, camera_maps)]
    layers += [_Layer(draw.texture, draw.shape, _sprite_maps(draw, times, height, width))
               for draw in sprite_draws[:sprites]]
    return _render(layers, frames, height, width, dtype)


def translation_clip(frames: int, height: int, width: int, dx: float, dy: float, seed: int = 0) -> Clip:
    """Background only; the content moves by exactly ``(dx, dy)`` pixels per frame (sub-pixel allowed)."""
    _check_size(frames, height, width)
    gen = torch.Generator().manual_seed(seed)
    texture = _draw_texture(gen)
    times = torch.arange(frames, dtype=torch.float64)
    scale = min(height, width) / REFERENCE_SIZE
    shift = times[:, None] * torch.tensor([dx, dy], dtype=torch.float64) / scale  # (F, 2) reference px
    maps = _camera_maps(times, height, width, shift, torch.zeros_like(times), torch.zeros_like(times))
    return _render([_Layer(texture, None, maps)], frames, height, width, torch.float32)


def rotation_clip(frames: int, height: int, width: int, degrees_per_frame: float, seed: int = 0) -> Clip:
    """Background only, rotating about the image centre ``((W-1)/2, (H-1)/2)``; positive degrees turn the
    content clockwise on screen (x right, y down): ``flow(p) = R(theta) (p - c) + c - p``."""
    _check_size(frames, height, width)
    gen = torch.Generator().manual_seed(seed)
    texture = _draw_texture(gen)
    times = torch.arange(frames, dtype=torch.float64)
    angle = times * math.radians(degrees_per_frame)
    maps = _camera_maps(times, height, width, torch.zeros(2, dtype=torch.float64), angle, torch.zeros_like(times))
    return _render([_Layer(texture, None, maps)], frames, height, width, torch.float32)


def frames_to_latent(frames: torch.Tensor) -> torch.Tensor:
    """(F, H, W, 3) frames -> (F, 4, H//8, W//8) test latents: 8x8 area mean, then the fixed affine map.

    Rows and columns that do not fill a whole 8x8 cell are dropped. Follows the frames' dtype and device."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape (F, H, W, 3), got {tuple(frames.shape)}")
    if frames.shape[1] < LATENT_SCALE or frames.shape[2] < LATENT_SCALE:
        raise ValueError(f"frames must be at least {LATENT_SCALE}x{LATENT_SCALE} pixels, "
                         f"got {frames.shape[1]}x{frames.shape[2]}")
    work = torch.promote_types(frames.dtype, torch.float32)
    cells = nnf.avg_pool2d(frames.to(work).permute(0, 3, 1, 2), LATENT_SCALE)  # (F, 3, h, w)
    matrix = LATENT_FROM_RGB.to(frames.device, work)
    latent = torch.einsum("lc,fchw->flhw", matrix, cells) + LATENT_BIAS.to(frames.device, work)[:, None, None]
    return latent.to(frames.dtype)


def latent_to_frames(latent: torch.Tensor) -> torch.Tensor:
    """(F, 4, h, w) test latents -> (F, 8h, 8w, 3) frames: pseudo-inverse map, clamp to [0, 1], each cell
    repeated over 8x8 pixels. Follows the latent's dtype and device."""
    if latent.ndim != 4 or latent.shape[1] != 4:
        raise ValueError(f"latent must have shape (F, 4, h, w), got {tuple(latent.shape)}")
    work = torch.promote_types(latent.dtype, torch.float32)
    centred = latent.to(work) - LATENT_BIAS.to(latent.device, work)[:, None, None]
    rgb = torch.einsum("cl,flhw->fchw", RGB_FROM_LATENT.to(latent.device, work), centred).clamp(0.0, 1.0)
    pixels = rgb.repeat_interleave(LATENT_SCALE, dim=2).repeat_interleave(LATENT_SCALE, dim=3)
    return pixels.permute(0, 2, 3, 1).to(latent.dtype)
