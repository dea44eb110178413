"""Text2Video-Zero motion dynamics: the host-free translation and re-noising, and the node in the real host."""
import pytest
import torch

from tve.nodes.text2video_node import MotionDynamicsLatents
from tve.engine.motion_dynamics import forward_noise, frame_shifts, grid_positions, motion_dynamics, translated_frames
from tve.tests.hosts import FAMILIES, make_conditioning, make_latent, make_tiny_model

real_host = pytest.mark.real_host
DTYPES = [torch.float32, torch.bfloat16]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the warp's coordinate round-off (bilinear weights of 1 ± ~1e-6 at whole-cell positions)."""
    tol = 1e-5 if a.dtype == torch.float32 else 1e-2
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * float(b.abs().max()))


def latent(seed: int = 0, dtype: torch.dtype = torch.float32, h: int = 12, w: int = 10) -> torch.Tensor:
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------- host-free
@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_cell_translation_is_a_roll_away_from_borders(dtype):
    x = latent(dtype=dtype)
    dx, dy = 2, -1
    frames = translated_frames(x, 4, float(dx), float(dy))
    assert frames.shape == (4, 4, 12, 10) and frames.dtype == dtype
    assert same(frames[0], x[0])
    for k in range(1, 4):
        rolled = torch.roll(x[0], shifts=(k * dy, k * dx), dims=(1, 2))
        # rows/columns that came in over a border are excluded: y < h − k·|dy| at the top edge, x ≥ k·dx
        assert same(frames[k][:, :12 - k, k * dx:], rolled[:, :12 - k, k * dx:])


def test_uncovered_border_mirrors_frame_zero_at_the_edge():
    x = latent()
    frames = translated_frames(x, 2, 3.0, 0.0)             # frame 1 samples x − 3: columns 0..2 are uncovered
    assert same(frames[1][..., 0], x[0][..., 2])
    assert same(frames[1][..., 1], x[0][..., 1])
    assert same(frames[1][..., 2], x[0][..., 0])
    frames = translated_frames(x, 2, 0.0, -2.0)            # frame 1 samples y + 2: the bottom 2 rows are uncovered
    assert same(frames[1][:, -1], x[0][:, -2])
    assert same(frames[1][:, -2], x[0][:, -1])


def test_fractional_motion_moves_whole_cells_without_blurring():
    assert frame_shifts(5, 1.5, -1.5).tolist() == [[0, 0], [2, -2], [3, -3], [5, -5], [6, -6]]
    x = latent()
    frames = translated_frames(x, 5, 1.5, 0.0)
    for k, shift in enumerate([0, 2, 3, 5, 6]):
        assert same(frames[k][..., shift:], x[0][..., :10 - shift])


def test_translation_starts_from_one_frame():
    with pytest.raises(ValueError, match="latent"):
        translated_frames(torch.zeros(2, 4, 8, 8), 3, 1.0, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_noise_reaches_the_marginal_variance(dtype):
    g = torch.Generator().manual_seed(3)
    sigma_0, sigma_1 = 2.0, 5.0
    x_t0 = (sigma_0 * torch.randn(200_000, generator=g)).to(dtype)        # clean signal 0, noised to σ0
    x_t1 = forward_noise(x_t0, sigma_0, sigma_1, torch.randn(200_000, generator=g).to(dtype))
    assert x_t1.dtype == dtype
    assert float(x_t1.float().std()) == pytest.approx(sigma_1, rel=0.01)
    assert float(x_t1.float().mean()) == pytest.approx(0.0, abs=0.05)


def test_forward_noise_refuses_to_go_down():
    with pytest.raises(ValueError, match="sigma_to"):
        forward_noise(torch.zeros(3), 5.0, 2.0, torch.zeros(3))


def test_step_indices_map_to_descending_grid_positions():
    assert grid_positions(44, 47, 50) == (2, 5)            # the official t = 941 and 881 of the 50-step DDIM list
    assert grid_positions(0, 49, 50) == (0, 49)


@pytest.mark.parametrize("t0, t1", [(3, 3), (4, 2), (-1, 2), (2, 7)])
def test_bad_step_indices_are_refused(t0, t1):
    with pytest.raises(ValueError, match="t0, t1"):
        grid_positions(t0, t1, 7)


# ---------------------------------------------------------------------------------------------- real host
FAST = dict(steps=6, cfg=7.5, scheduler="ddim_uniform", t0=2, t1=4)     # ddim_uniform 6 → a 7-step grid


def run(model, family: str, seed: int = 5, frames: int = 3, motion=(1.0, -2.0), h: int = 8, w: int = 8, **over):
    args = {**FAST, **over}
    return motion_dynamics(model, make_conditioning(family, seed=1), make_conditioning(family, seed=2), (4, h, w),
                           seed, frames, motion[0], motion[1], **args)


@pytest.fixture(scope="module")
def sd15():
    return make_tiny_model("sd15")


@real_host
@pytest.mark.parametrize("family", FAMILIES)
def test_node_outputs_frames_at_sigma_t1_and_the_rest_of_the_grid(family):
    from tve.engine import host
    model = make_tiny_model(family)
    out_latent, sigmas, start = MotionDynamicsLatents.execute(
        model, make_conditioning(family, seed=1), make_conditioning(family, seed=2), make_latent(2, 8, 8), seed=0,
        frames=3, motion_x=1.0, motion_y=0.0, **FAST).result
    grid = host.sigma_grid(model, "ddim_uniform", 6)
    assert len(grid) == 8 and start == 7 - 1 - 4
    assert out_latent["samples"].shape == (3, 4, 8, 8)
    assert torch.isfinite(out_latent["samples"]).all()
    assert torch.allclose(sigmas, grid[start:]) and float(sigmas[-1]) == 0.0


@real_host
def test_frames_differ_only_by_the_translation_before_renoising(sd15):
    result = run(sd15, "sd15", frames=4, motion=(1.0, -2.0))
    assert same(result.warped_t0[0], result.anchor_t0[0])
    for k in range(1, 4):
        rolled = torch.roll(result.anchor_t0[0], shifts=(-2 * k, k), dims=(1, 2))
        assert same(result.warped_t0[k][:, :8 - 2 * k, k:], rolled[:, :8 - 2 * k, k:])
    assert torch.equal(result.latents[0], result.anchor_t1[0])        # frame 0 keeps its own σ_t1 latent
    # re-noising: fresh unit noise per frame, drawn from the seed's generator after x_T (the documented order)
    g = torch.Generator().manual_seed(5)
    torch.randn(1, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    sigma_t1, sigma_t0 = float(result.sigmas[0]), float(result.sigmas[2])
    added = (result.latents[1:] - result.warped_t0[1:]) / (sigma_t1 ** 2 - sigma_t0 ** 2) ** 0.5
    assert torch.allclose(added, eps, atol=1e-4)


@real_host
def test_frame_zero_follows_a_core_ksampler_with_the_same_seed(sd15):
    from tve.engine import host
    result = run(sd15, "sd15", seed=11)
    empty = torch.zeros(1, 4, 8, 8)
    (core,) = host.run_core_node("KSamplerAdvanced", model=sd15, add_noise="enable", noise_seed=11, steps=6, cfg=7.5,
                                 sampler_name="euler", scheduler="ddim_uniform",
                                 positive=make_conditioning("sd15", seed=1), negative=make_conditioning("sd15", seed=2),
                                 latent_image={"samples": empty}, start_at_step=0, end_at_step=result.start_step,
                                 return_with_leftover_noise="enable")          # stops at start_step, not denoised
    assert torch.allclose(result.raw_latents[:1], core["samples"], atol=1e-5, rtol=1e-5)


@real_host
def test_same_seed_same_latents_other_seed_other_latents(sd15):
    a, b, c = run(sd15, "sd15", seed=5), run(sd15, "sd15", seed=5), run(sd15, "sd15", seed=6)
    assert torch.equal(a.raw_latents, b.raw_latents)
    assert not torch.allclose(a.raw_latents, c.raw_latents)


@real_host
def test_a_core_sampler_continues_from_exactly_these_latents_at_sigma_t1(sd15):
    from tve.engine import host
    result = run(sd15, "sd15")
    seen = {}
    host.sample(sd15, torch.zeros_like(result.raw_latents), 7.5, "euler", result.sigmas,
                make_conditioning("sd15", seed=1), make_conditioning("sd15", seed=2), result.raw_latents,
                callback=lambda i, x0, x, total: seen.setdefault(i, x.clone()))
    assert sorted(seen) == list(range(len(result.sigmas) - 1))
    assert torch.allclose(seen[0], result.latents, atol=1e-5)


@real_host
@pytest.mark.parametrize("over, name", [(dict(t0=4, t1=4), "t0, t1"), (dict(t0=2, t1=7), "t0, t1"),
                                        (dict(frames=0), "frames"), (dict(scheduler="nope"), "scheduler")])
def test_bad_inputs_raise_clear_errors(sd15, over, name):
    over = dict(over)
    frames = over.pop("frames", 3)
    with pytest.raises(ValueError, match=name):
        run(sd15, "sd15", frames=frames, **over)
