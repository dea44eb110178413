"""The committed test model (tools/test_model, made by tools/train_test_model.py) inside the real ComfyUI."""
import json

import pytest
import torch

from tve.tests.trained_model import EMBEDDINGS, WEIGHTS, load_trained_model, trained_conditioning
from tve.tools.train_test_model import CONDITIONING_NAMES, HELD_OUT_SEED, LUMA, UNET_CONFIG, render_frames
from tve.tools.video_world import latent_to_frames

pytestmark = pytest.mark.real_host
MAX_BYTES = 5_000_000


def _sample(model, noise: torch.Tensor, name: str, cfg: float, steps: int = 20) -> torch.Tensor:
    """Euler over ``steps`` steps of the normal schedule (what core's KSampler samples with these settings)."""
    from tve.engine import host
    return host.sample(model, noise, cfg, "euler", host.sigma_grid(model, "normal", steps), trained_conditioning(name),
                       trained_conditioning("empty"), torch.zeros_like(noise), seed=0)


def test_committed_weights_are_small_fp16_and_load_into_comfys_sd15_unet():
    from safetensors import safe_open

    from tve.engine import host

    assert WEIGHTS.stat().st_size <= MAX_BYTES
    with safe_open(str(WEIGHTS), framework="pt") as f:
        assert json.loads(f.metadata()["unet_config"]) == UNET_CONFIG
        weights = {k: f.get_tensor(k) for k in f.keys()}
    assert {v.dtype for v in weights.values()} == {torch.float16}
    model = load_trained_model()
    assert host.model_family(model) == "SD15/EPS"                  # comfy's SD15 config, an EPS BaseModel
    assert float(model.get_model_object("model_sampling").sigma_max) == pytest.approx(14.6146, rel=1e-4)  # SD1.5
    state = model.model.diffusion_model.state_dict()
    assert state.keys() == weights.keys()
    assert all(torch.equal(state[k], v.float()) for k, v in weights.items())
    assert EMBEDDINGS.stat().st_size <= 400_000
    embeddings = [trained_conditioning(name)[0][0] for name in CONDITIONING_NAMES]
    assert all(e.shape == (1, 77, 768) for e in embeddings)
    assert min((a - b).abs().mean() for i, a in enumerate(embeddings) for b in embeddings[i + 1:]) > 0.5


def test_inversion_then_reconstruction_of_a_held_out_clip_is_faithful():
    from tve.engine import host
    from tve.engine.inversion import invert

    model = load_trained_model()
    cond = trained_conditioning("source")
    raw = render_frames(1, 3, HELD_OUT_SEED + 7)  # (3, 4, 16, 16), a world seed never trained on
    x_T, inversion = invert(model, raw, cond, 50, "ddim_uniform")
    recon = host.sample(model, torch.zeros_like(x_T), 1.0, "euler", inversion.sigmas, cond, cond, x_T)
    error = float((recon - raw).norm() / raw.norm())  # raw and model space differ by one factor: same ratio
    assert error < 0.10
    assert float((x_T - raw).norm() / raw.norm()) > 1.0  # x_T really is the noisy end of the walk


def test_target_conditioning_recolours_to_the_warm_duotone():
    model = load_trained_model()
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    frames = {name: latent_to_frames(_sample(model, noise, name, 5.0)).double() for name in ("source", "target")}

    def warmth(f):  # mean R - B: the duotone puts every pixel between 0.17 and 0.40
        return float((f[..., 0] - f[..., 2]).mean())

    def chroma(f):  # colour left once the luminance grey is taken out; the duotone's is fixed by the luminance
        luma = f @ torch.tensor(LUMA, dtype=f.dtype)
        return float((f - luma[..., None]).std())

    assert 0.17 < warmth(frames["target"]) < 0.45
    assert warmth(frames["target"]) > warmth(frames["source"]) + 0.25
    assert chroma(frames["target"]) < 0.7 * chroma(frames["source"])


@pytest.mark.real_host
def test_full_injection_with_the_source_prompt_reproduces_the_reconstruction():
    """Issue #3 with a model that can invert: PnP injection of the source into an edit with the source prompt
    keeps the reconstruction (both near the source)."""
    from tve.engine import host
    from tve.engine.injection import apply_feature_injection
    from tve.engine.inversion import invert
    from tve.tests.trained_model import load_trained_model, trained_conditioning
    from tve.tools.train_test_model import HELD_OUT_SEED
    from tve.tools.video_world import frames_to_latent, render_clip

    model, source = load_trained_model(), trained_conditioning("source")
    x0 = frames_to_latent(render_clip(3, 128, 128, seed=HELD_OUT_SEED + 7).frames)
    x_T, inversion = invert(model, x0, source, 25, "ddim_uniform")

    def sample(m):
        return host.sample(m, torch.zeros_like(x_T), 1.0, "euler", inversion.sigmas, source, source, x_T)

    plain = sample(model)
    injected = sample(apply_feature_injection(model, inversion, 1.0, 1.0, "tokenflow", "sigma-matched"))
    assert float((injected - plain).norm() / plain.norm()) < 0.05
    assert float((injected - x0).norm() / x0.norm()) < 0.15
