"""Train the pack's test model: a small SD1.5-architecture UNet, on the CPU, on the procedural video world.

Real SD weights are too big for CI and a randomly initialised UNet cannot tell an edit from noise, so this trains
comfy's own SD1.5 UNet (``comfy.supported_models.SD15`` -> ``BaseModel``, EPS prediction, SD1.5's discrete
1000-step scaled-linear schedule) on frames of ``tools/video_world.py`` in its linear test latent space, under
three fixed conditioning embeddings, each ``(1, 77, 768)`` like an SD1.5 CONDITIONING tensor:

    source  the frames as rendered
    target  ``target_style(frames)``: the deterministic duotone ``recolour`` plus ``stripes`` whose angle and phase
            are drawn at random per sample, which no per-pixel rule produces: editing frame by frame draws
            other stripes in every frame (flicker), the failure the pack's video methods exist to prevent
    empty   either of the two (10 % condition dropout): the unconditional branch of classifier-free guidance

The UNet is trained directly on what ``BaseModel._apply_model`` feeds it at inference: the model-space latent
``x = x0 + σ ε`` (``x0 = 0.18215 · raw``, ``σ = model_sampling.sigmas[t]``) scaled by ``1 / sqrt(σ² + 1)``,
the integer timestep ``t`` and the embedding as context; the loss is the MSE on ε (DDPM's simple loss), so the
weights work inside comfy's samplers unchanged.

Two testbeds (``TESTBEDS``), each a folder of ``tools/``:

    test_model      128 x 128 frames (16 x 16 latents), 2 UNet levels, stripes of 32 px; the demo and most tests.
                    33 min wall measured on 2 CPU cores shared with other jobs, load average 4-5: 41 s to render
                    1200 frames, then 1600 AdamW steps of batch 16 at 1.2 s/step on one thread; 2.3 M parameters,
                    4.7 MB of fp16:

        COMFYUI_PATH=/path/to/ComfyUI python tools/train_test_model.py

    test_model_256  256 x 256 frames (32 x 32 latents) that a person can read, SD1.5's layout (4 levels, attention
                    at the first three and in the middle block), stripes of 64 px (8 cells); bench/consistency.py
                    and bench/diagnose.py. 2400 steps on random 16 x 16-cell crops, then 700 on whole frames
                    (attention meets the 1024 tokens of inference); 3.75 M parameters, 7.5 MB of fp16. 51.5 min wall
                    measured on 2 CPU cores, one thread, the other core busy with a second training run: 27 s to
                    render 1200 frames, crop steps at 0.5 s, whole-frame steps at 2.3 s. (The first weights, 850 +
                    250 steps, drew the duotone's colours wrong, speckled, and lost the sprites under the edit.)

        COMFYUI_PATH=/path/to/ComfyUI python tools/train_test_model.py --testbed test_model_256 --steps 3100 \
            --crop-steps 2400

Writes ``tools/<testbed>/unet.safetensors`` (the EMA weights in fp16; metadata ``unet_config`` is the JSON config
to build it with, ``testbed`` its frame size and stripe period) and ``conditioning.safetensors`` (``source``, ``target``, ``empty``). Training uses the world's seeds
``0 .. clips-1``; seeds from ``HELD_OUT_SEED`` on are never seen. ``--check`` reports DDIM-inversion
reconstruction errors on held-out clips and writes a sample grid PNG.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if "tve" not in sys.modules:  # run as a script: register the pack alias first
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _tve_alias  # noqa: F401

from tve.tools.video_world import CAMERAS, MAX_SPRITES, frames_to_latent, latent_to_frames, render_clip

UNET_CONFIG = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4,
    out_channels=4, model_channels=64, channel_mult=[1, 1], num_res_blocks=[1, 1],
    transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
    use_linear_in_transformer=False, context_dim=768, adm_in_channels=None, use_temporal_resblock=False,
    use_temporal_attention=False, num_heads=-1, num_head_channels=32,
)  # SD1.5's block layout shrunk to 2 levels (16 and 8 latent px) with attention at both. 64 channels, not 32:
# comfy's GroupNorm has 32 groups, and with one channel per group it would erase every per-channel constant
# (the timestep embedding, a global colour shift) at each norm.
UNET_CONFIG_256 = dict(
    UNET_CONFIG, channel_mult=[1, 1, 1, 1], num_res_blocks=[1, 1, 1, 1], transformer_depth=[1, 1, 1, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0],
)  # SD1.5's layout at 32 x 32 latents: 4 levels (32, 16, 8, 4 latent px), attention at the first three and in the
# middle block, none at the deepest level, as SD1.5 has it; one ResBlock per level and 64 channels throughout
# keep the fp16 weights at 7.5 MB.
CONDITIONING_NAMES = ("source", "target", "empty")
EMBEDDING_SEED = 1234
HELD_OUT_SEED = 100_000  # the world's seeds from here on are held out of training
FRAME_SIZE = 128  # training frames of tools/test_model are 128 x 128 pixels: 16 x 16 latents

LUMA = (0.299, 0.587, 0.114)  # Rec. 601 luminance weights
DUOTONE_DARK = (0.32, 0.20, 0.15)  # colour of luminance 0
DUOTONE_LIGHT = (0.85, 0.70, 0.45)  # colour of luminance 1
STRIPE_PERIOD = 32.0  # pixels (4 latent cells) in tools/test_model's target style
STRIPE_AMPLITUDE = 0.15  # added to every channel; recolour + stripes stays in [0, 1], nothing is clamped


@dataclass(frozen=True)
class Testbed:
    """One trained test model: its UNet, the frame size it is trained and judged at, its stripe period."""
    unet_config: dict
    frame_size: int  # pixels, square frames
    stripe_period: float  # pixels
    crop: int  # latent cells of the random square crops of the first training phase (frame_size // 8: no crops)


TESTBEDS = {
    "test_model": Testbed(UNET_CONFIG, FRAME_SIZE, STRIPE_PERIOD, FRAME_SIZE // 8),
    # 256 x 256 frames (32 x 32 latents) that a person can read: sprites 8-16 cells across, stripes of 8 cells
    "test_model_256": Testbed(UNET_CONFIG_256, 256, 64.0, 16),
}


# ------------------------------------------------------------------------------------------ the target style
def recolour(frames: torch.Tensor) -> torch.Tensor:
    """The deterministic part of the target style: a warm duotone of the luminance.

    ``(F, H, W, 3)`` in [0, 1] -> same shape: ``DUOTONE_DARK + Y · (DUOTONE_LIGHT − DUOTONE_DARK)`` with ``Y`` the
    Rec. 601 luminance. Every pixel comes out warm (R > G > B, R − B between 0.17 and 0.40), chroma is gone and
    the light/dark structure is kept. Affine, so it commutes with the latent space's 8x8 cell means.
    """
    luma = frames @ torch.tensor(LUMA, dtype=frames.dtype, device=frames.device)  # (F, H, W)
    dark = torch.tensor(DUOTONE_DARK, dtype=frames.dtype, device=frames.device)
    light = torch.tensor(DUOTONE_LIGHT, dtype=frames.dtype, device=frames.device)
    return dark + luma[..., None] * (light - dark)


def stripes(height: int, width: int, angle: torch.Tensor, phase: torch.Tensor,
            period: float = STRIPE_PERIOD) -> torch.Tensor:
    """Sinusoidal stripes ``A sin(2π (x cos θ + y sin θ) / P + φ)`` at pixel centres ``(x, y)``.

    ``angle`` θ and ``phase`` φ are ``(F,)`` radians -> ``(F, H, W)`` in their dtype; ``A = STRIPE_AMPLITUDE``,
    ``P = period`` pixels."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=angle.dtype, device=angle.device),
                            torch.arange(width, dtype=angle.dtype, device=angle.device), indexing="ij")
    along = xs * angle.cos()[:, None, None] + ys * angle.sin()[:, None, None]  # (F, H, W) pixels
    return STRIPE_AMPLITUDE * torch.sin(2 * math.pi * along / period + phase[:, None, None])


def fit_stripes(frames: torch.Tensor, angles: int = 90,
                period: float = STRIPE_PERIOD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares fit of ``stripes`` to the channel mean of each frame ``(F, H, W, 3)``, over ``angles``
    angles in [0, π): returns ``(angle, phase, amplitude)``, each ``(F,)`` float64. The frames' own content
    leaves some amplitude too: compare with the same fit on unstyled frames."""
    count, height, width, _ = frames.shape
    grey = frames.double().mean(-1)
    grey = grey - grey.mean(dim=(1, 2), keepdim=True)  # (F, H, W)
    theta = torch.arange(angles, dtype=torch.float64) * math.pi / angles  # (A,)
    sine = stripes(height, width, theta, torch.zeros_like(theta), period) / STRIPE_AMPLITUDE  # (A, H, W)
    cosine = stripes(height, width, theta, torch.full_like(theta, math.pi / 2), period) / STRIPE_AMPLITUDE
    along_sin = torch.einsum("fhw,ahw->fa", grey, sine) / (height * width / 2)  # A cos φ
    along_cos = torch.einsum("fhw,ahw->fa", grey, cosine) / (height * width / 2)  # A sin φ
    amplitude, best = torch.hypot(along_sin, along_cos).max(dim=1)
    rows = torch.arange(count)
    phase = torch.atan2(along_cos[rows, best], along_sin[rows, best]).remainder(2 * math.pi)
    return theta[best], phase, amplitude


def target_style(frames: torch.Tensor, generator: torch.Generator, period: float = STRIPE_PERIOD) -> torch.Tensor:
    """What the ``target`` embedding means: ``recolour(frames)`` plus ``stripes`` of ``period`` pixels with an angle
    in [0, π) and a phase in [0, 2π) drawn from ``generator`` for every frame independently. ``(F, H, W, 3)`` ->
    same shape."""
    count, height, width, _ = frames.shape
    angle = math.pi * torch.rand(count, generator=generator, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(count, generator=generator, dtype=torch.float64)
    pattern = stripes(height, width, angle, phase, period).to(frames.device, frames.dtype)
    return recolour(frames) + pattern[..., None]


def conditioning_embeddings(seed: int = EMBEDDING_SEED) -> dict[str, torch.Tensor]:
    """The three fixed embeddings, seeded N(0, 1) of shape ``(1, 77, 768)``, rounded to fp16 values."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(1, 77, 768, generator=gen).half().float() for name in CONDITIONING_NAMES}


# ------------------------------------------------------------------------------------------ the model
def build_model(unet_config: dict):
    """comfy's SD15 config with this UNet layout -> a MODEL (ModelPatcher around a ``BaseModel``, EPS, fp32, CPU)
    with uninitialised weights (comfy skips init), built by the host adapter (``host.build_model``)."""
    from tve.engine import host
    return host.build_model("SD15", unet_config, "EPS")


def initialise(unet: torch.nn.Module) -> None:
    """PyTorch's default init for convolutions and linears, unit norms, and the LDM zero-init of every residual
    branch's last layer (ResBlock out conv, transformer proj_out) and of the output conv: the untrained UNet is
    close to identity plus a zero output."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    for module in unet.modules():
        for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm):
            if isinstance(module, base):
                base.reset_parameters(module)
    zeroed = [unet.out[-1]]
    zeroed += [m.out_layers[-1] for m in unet.modules() if isinstance(m, ResBlock)]
    zeroed += [m.proj_out for m in unet.modules() if isinstance(m, SpatialTransformer)]
    with torch.no_grad():
        for layer in zeroed:
            for p in layer.parameters():
                p.zero_()


# ------------------------------------------------------------------------------------------ data
def render_frames(clips: int, frames: int, first_seed: int = 0, size: int = FRAME_SIZE) -> torch.Tensor:
    """Raw test latents ``(clips · frames, 4, size/8, size/8)`` of world seeds ``first_seed ..``: every moving
    camera, 0-3 sprites, time sped up 3x so that a clip's frames differ."""
    moving = CAMERAS[1:]
    latents = []
    for seed in range(first_seed, first_seed + clips):
        clip = render_clip(frames, size, size, seed=seed, camera=moving[seed % len(moving)],
                           sprites=(seed // len(moving)) % (MAX_SPRITES + 1), speed=3.0)
        latents.append(frames_to_latent(clip.frames))
    return torch.cat(latents)


def styled(raw: torch.Tensor, generator: torch.Generator, period: float = STRIPE_PERIOD) -> torch.Tensor:
    """Raw latents of ``target_style`` applied to the frames the raw latents ``(B, 4, h, w)`` decode to.

    The decode is exact (cell means repeated over 8x8 pixels) and the style is affine in the pixels, so this is
    the latent of the styled original frames."""
    return frames_to_latent(target_style(latent_to_frames(raw), generator, period))


def random_crops(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``size x size`` window of each latent ``(B, C, h, w)`` -> ``(B, C, size, size)``."""
    rows = torch.randint(0, x.shape[-2] - size + 1, (x.shape[0],), generator=generator).tolist()
    cols = torch.randint(0, x.shape[-1] - size + 1, (x.shape[0],), generator=generator).tolist()
    return torch.stack([item[:, r:r + size, c:c + size] for item, r, c in zip(x, rows, cols)])


def dihedral(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each latent ``(B, C, h, w)`` turned by a random multiple of 90° and maybe mirrored (the world is isotropic)."""
    turns = torch.randint(0, 4, (x.shape[0],), generator=generator).tolist()
    mirror = (torch.rand(x.shape[0], generator=generator) < 0.5).tolist()
    out = [torch.rot90(item, k, dims=(1, 2)) for item, k in zip(x, turns)]
    return torch.stack([item.flip(2) if m else item for item, m in zip(out, mirror)])


# ------------------------------------------------------------------------------------------ training
def train(bank: torch.Tensor, steps: int, batch: int, lr: float, seed: int, log_every: int = 50,
          testbed: Testbed = TESTBEDS["test_model"], crop_steps: int = 0):
    """Train a fresh UNet on the raw latents ``bank``; returns ``(model, ema_state_dict, losses)``.

    The first ``crop_steps`` steps see random ``testbed.crop``-cell windows of the frames (4x cheaper per sample at
    half the side; the UNet is convolutional and its attention is over the tokens it gets), the rest whole frames,
    so that attention learns the token count it meets at inference."""
    torch.manual_seed(seed)
    model = build_model(testbed.unet_config).model
    unet = model.diffusion_model
    initialise(unet)
    unet.train()
    sampling = model.model_sampling
    embeddings = conditioning_embeddings()
    contexts = torch.cat([embeddings[name] for name in CONDITIONING_NAMES])  # (3, 77, 768)
    gen = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.99))
    warmup = max(1, min(200, steps // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: min(1.0, (i + 1) / warmup) * (
        0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps))))
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    losses = []
    started = time.perf_counter()
    for step in range(steps):
        raw = dihedral(bank[torch.randint(0, len(bank), (batch,), generator=gen)], gen)
        if step < crop_steps:
            raw = random_crops(raw, testbed.crop, gen)
        target = torch.rand(batch, generator=gen) < 0.5
        raw = torch.where(target[:, None, None, None], styled(raw, gen, testbed.stripe_period), raw)
        which = torch.where(torch.rand(batch, generator=gen) < 0.1, 2, target.long())  # 0 source, 1 target, 2 empty
        x0 = model.process_latent_in(raw)
        t = torch.randint(0, len(sampling.sigmas), (batch,), generator=gen)
        sigma = sampling.sigmas[t].reshape(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=gen)
        x_in = sampling.calculate_input(sigma, x0 + sigma * noise)  # (x0 + σ ε) / sqrt(σ² + 1)
        loss = torch.nn.functional.mse_loss(unet(x_in, t.float(), context=contexts[which]), noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].lerp_(v, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            print(f"step {step + 1}/{steps} loss {sum(losses[-log_every:]) / len(losses[-log_every:]):.4f} "
                  f"lr {schedule.get_last_lr()[0]:.2e} {elapsed / (step + 1):.3f} s/step {elapsed / 60:.1f} min",
                  flush=True)
    unet.load_state_dict(ema)
    unet.eval()
    return model, ema, losses


def save(out: Path, ema: dict, seconds: float, steps: int, testbed: Testbed = TESTBEDS["test_model"]) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    metadata = {"unet_config": json.dumps(testbed.unet_config),
                "training": json.dumps({"steps": steps, "seconds": round(seconds)}),
                "testbed": json.dumps({"frame_size": testbed.frame_size, "stripe_period": testbed.stripe_period}),
                "description": "TVE test model: SD1.5-architecture UNet trained on tools/video_world.py"}
    save_file({k: v.half().contiguous() for k, v in ema.items()}, str(out / "unet.safetensors"), metadata=metadata)
    save_file({k: v.half().contiguous() for k, v in conditioning_embeddings().items()},
              str(out / "conditioning.safetensors"))


def load(model_dir: Path):
    """The saved model as a ModelPatcher (fp32, frozen) and its CONDITIONINGs by name."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(model_dir / "unet.safetensors"), framework="pt") as f:
        unet_config = json.loads(f.metadata()["unet_config"])
    patcher = build_model(unet_config)
    patcher.model.diffusion_model.load_state_dict(load_file(str(model_dir / "unet.safetensors")))  # strict
    patcher.model.eval().requires_grad_(False)  # as a loaded checkpoint is used: sampling builds no autograd graph
    embeddings = load_file(str(model_dir / "conditioning.safetensors"))
    return patcher, {name: [[embedding.float(), {}]] for name, embedding in embeddings.items()}


# ------------------------------------------------------------------------------------------ checks
def _degrees(radians: torch.Tensor) -> list[int]:
    return [round(math.degrees(v)) for v in radians.tolist()]


def check(model_dir: Path, png: Path, testbed: Testbed = TESTBEDS["test_model"]) -> None:
    """Inversion -> reconstruction errors on held-out clips at 10/25/50 steps, and a grid of target samples."""
    import comfy.sample
    import comfy.samplers
    from PIL import Image

    from tve.engine.inversion import invert

    patcher, cond = load(model_dir)
    model = patcher.model
    raw = render_frames(4, 2, HELD_OUT_SEED, testbed.frame_size)  # 8 held-out frames
    x0 = model.process_latent_in(raw)
    euler = comfy.samplers.sampler_object("euler")
    for steps in (10, 25, 50):
        x_T, inversion = invert(patcher, raw, cond["source"], steps, "ddim_uniform")
        recon = comfy.sample.sample_custom(patcher, torch.zeros_like(x_T), 1.0, euler, inversion.sigmas,
                                           cond["source"], cond["source"], x_T, disable_pbar=True)
        error = (model.process_latent_in(recon) - x0).norm() / x0.norm()
        print(f"inversion->reconstruction, {steps} ddim_uniform steps: relative error {float(error):.4f}", flush=True)
    cells = testbed.frame_size // 8
    noise = torch.randn(6, 4, cells, cells, generator=torch.Generator().manual_seed(7))
    rows = [latent_to_frames(raw[:6])]
    for name in ("source", "target"):
        latent = comfy.sample.sample(patcher, noise, 30, 5.0, "euler", "normal", cond[name], cond["empty"],
                                     torch.zeros_like(noise), disable_pbar=True, seed=7)
        rows.append(latent_to_frames(latent))
        angle, phase, amplitude = fit_stripes(rows[-1], period=testbed.stripe_period)
        warmth = (rows[-1][..., 0] - rows[-1][..., 2]).mean(dim=(1, 2))
        print(f"{name} samples, cfg 5: mean R-B {[round(float(w), 3) for w in warmth]}; stripe fit: angle (deg) "
              f"{_degrees(angle)} phase (deg) {_degrees(phase)} amplitude {[round(a, 3) for a in amplitude.tolist()]}")
    grid = torch.cat([torch.cat(list(row), dim=1) for row in rows], dim=0)  # (rows·H, 6·W, 3)
    Image.fromarray((grid.clamp(0, 1) * 255).round().byte().numpy()).save(png)
    print(f"samples (rows: held-out frames, source cfg 5, target cfg 5) -> {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--testbed", choices=sorted(TESTBEDS), default="test_model",
                        help="which model: its UNet, frame size and stripe period (TESTBEDS)")
    parser.add_argument("--out", type=Path, help="output folder (default tools/<testbed>)")
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--frames", type=int, default=12, help="frames per clip")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop-steps", type=int, default=0,
                        help="first steps on random crops of the testbed's crop size (it has no crops: ignored)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 because OpenMP threads that spin-wait stall (20x slower) when other "
                             "processes share the cores, unless OMP_WAIT_POLICY=PASSIVE is set")
    parser.add_argument("--bank", type=Path, help="cache file for the rendered latents (reused when present)")
    parser.add_argument("--check", action="store_true", help="only evaluate the weights in --out")
    parser.add_argument("--png", type=Path, default=Path("/tmp/tve_test_model_samples.png"))
    opts = parser.parse_args()
    testbed = TESTBEDS[opts.testbed]
    out = opts.out if opts.out is not None else Path(__file__).resolve().parent / opts.testbed
    torch.set_num_threads(opts.threads)
    torch.set_flush_denormal(True)  # zero-initialised branches otherwise run on denormals, 10x slower on CPU
    _tve_alias.real_host(sdpa_attention=not opts.check)
    if opts.check:
        with torch.inference_mode():
            check(out, opts.png, testbed)
        return
    started = time.perf_counter()
    if opts.bank is not None and opts.bank.exists():
        bank = torch.load(opts.bank)
    else:
        bank = render_frames(opts.clips, opts.frames, size=testbed.frame_size)
        if opts.bank is not None:
            torch.save(bank, opts.bank)
    print(f"{len(bank)} training frames ready after {time.perf_counter() - started:.0f} s", flush=True)
    crop_steps = opts.crop_steps if testbed.crop < testbed.frame_size // 8 else 0
    model, ema, losses = train(bank, opts.steps, opts.batch, opts.lr, opts.seed, testbed=testbed,
                               crop_steps=crop_steps)
    seconds = time.perf_counter() - started
    save(out, ema, seconds, opts.steps, testbed)
    parameters = sum(v.numel() for v in ema.values())
    print(f"{parameters} parameters, {seconds / 60:.1f} min in all -> {out}", flush=True)


if __name__ == "__main__":
    main()
