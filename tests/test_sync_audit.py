"""The sync audit (tests/sync_audit.py) and the pack's device->host syncs per attention / UNet block (issue 25).

A sync inside the UNet stalls an accelerator's queue at every block; the pack is to make none there (once per step
is fine). ``SyncAudit`` sees them on the CPU: the first tests check it counts planted syncs and ignores host-side
bookkeeping; the others sample each method and list what its code reads per block. Methods that still sync per
block are expected failures naming the sites (strict: when the engine change removes them, the mark must go).
"""
import pytest
import torch

from tve.tests.hosts import REAL_HOST, make_conditioning, make_tiny_model
from tve.tests.sync_audit import ROOT, SyncAudit

pytestmark = pytest.mark.real_host

FRAMES, SIZE, STEPS = 3, 16, 2


def sample(model, x_T, sigmas):
    from tve.engine import host
    return host.sample(model, torch.zeros_like(x_T), 5.0, "euler", sigmas, make_conditioning("sd15", 2),
                       make_conditioning("sd15", 3), x_T, seed=0)


def audit(model, x_T, sigmas, sites=None) -> SyncAudit:
    found = SyncAudit() if sites is None else SyncAudit(sites)
    audited = found.audited(model)
    with torch.inference_mode(), found:
        sample(audited, x_T, sigmas)
    return found


@pytest.fixture(scope="module")
def video():
    from tve.engine.inversion import invert
    model = make_tiny_model("sd15") if REAL_HOST else None
    latent = torch.randn(FRAMES, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        x_T, inversion = invert(model, latent, make_conditioning("sd15", 1), STEPS, "ddim_uniform")
    return model, x_T, inversion


def test_planted_syncs_are_counted_per_block_and_host_bookkeeping_is_not(video):
    model, x_T, inversion = video
    calls = []

    def planted(n, context, value, extra_options):
        calls.append(1)
        n.mean().item()                                          # device -> host read
        torch.equal(n, n)                                        # device -> host read
        n[n > 0].sum()                                           # data-dependent size
        torch.tensor([0, 1], device=n.device)                    # host -> device copy
        torch.arange(3).tolist()                                 # host bookkeeping: no sync
        torch.arange(3, device=n.device)                         # made on the device: no sync
        extra_options["sigmas"].cpu()                            # device -> host copy
        return n, context, value

    m = model.clone()
    m.set_model_attn1_patch(planted)
    found = audit(m, x_T, inversion.sigmas, sites=(__file__,))
    site = f"{__file__.rsplit(str(ROOT) + '/', 1)[-1]}:"
    kinds = {}
    for (kind, where, via), n in found.events("block").items():
        assert where.startswith(site)
        kinds[kind] = kinds.get(kind, 0) + n
    blocks = len(calls)
    assert blocks > 0
    assert kinds == {"device->host read": 2 * blocks, "data-dependent size (bool mask)": blocks,
                     "host->device copy": blocks, "device->host copy": blocks}
    assert not [e for e in found.events("call") if not e[2]]    # the host's own syncs are attributed "via" it


def test_a_plain_model_makes_no_pack_syncs(video):
    model, x_T, inversion = video
    assert not audit(model, x_T, inversion.sigmas).events()


# ---------------------------------------------------------------------------------------------- the pack's methods
def _pnp(model, inversion, trajectories):
    from tve.engine.injection import apply_feature_injection
    return apply_feature_injection(model, inversion, 0.5, 1.0, "tokenflow", "sigma-matched")


def _pnp_windows(model, inversion, trajectories):
    from tve.engine.stack import apply_frame_windows
    return apply_frame_windows(_pnp(model, inversion, trajectories), 2, 1)


def _flatten(model, inversion, trajectories):
    from tve.engine.flatten import apply_flatten
    from tve.engine.injection import apply_feature_injection
    return apply_feature_injection(apply_flatten(model, trajectories, "highest resolution", "dense_output"),
                                   inversion, 0.5, 1.0, "flatten", "sigma-matched")


def _tokenflow(mode, windows=0):
    def apply(model, inversion, trajectories):
        from tve.engine.stack import apply_frame_windows
        from tve.engine.tokenflow import apply_tokenflow
        patched = apply_tokenflow(model, inversion, 2, 0, mode, 0.5, 1.0)
        return apply_frame_windows(patched, windows, 0) if windows else patched
    return apply


def _cross_frame(mode):
    def apply(model, inversion, trajectories):
        from tve.engine.cross_frame import apply_cross_frame
        return apply_cross_frame(model, mode, 2, 0, False, 2, 0, "all", 0.0, 1.0)
    return apply


METHODS = [
    pytest.param(_pnp, id="pnp"),
    pytest.param(_pnp_windows, id="pnp-frame-windows"),
    pytest.param(_flatten, id="flatten"),
    pytest.param(_tokenflow("paper"), id="tokenflow"),
    pytest.param(_tokenflow("official"), id="tokenflow-official"),
    pytest.param(_tokenflow("paper", 2), id="tokenflow-frame-windows"),
    pytest.param(_tokenflow("official", 2), id="tokenflow-official-frame-windows"),
    pytest.param(_cross_frame("keyframes"), id="keyframes"),
    pytest.param(_cross_frame("anchor"), id="anchor"),
    pytest.param(_cross_frame("dense"), id="dense"),
]


@pytest.fixture(scope="module")
def trajectories():
    from tve.flow.estimate import FlowField
    from tve.flow.trajectories import build_trajectories
    px = 8 * SIZE
    forward = torch.tensor([2.0, 1.0]).view(1, 2, 1, 1).expand(FRAMES - 1, 2, px, px).contiguous()
    flow = FlowField(forward, -forward, torch.zeros(FRAMES - 1, px, px, dtype=torch.bool), "translation")
    return build_trajectories(flow, (SIZE, SIZE))


@pytest.mark.parametrize("method", METHODS)
def test_no_device_to_host_sync_inside_the_unet(video, trajectories, method):
    model, x_T, inversion = video
    found = audit(method(model, inversion, trajectories), x_T, inversion.sigmas)
    per_block = found.events("block")
    assert not per_block, f"syncs per attention / UNet block ({STEPS} steps):\n{found.report('block')}"
