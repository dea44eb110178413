"""The source pass ends its UNet call after the last feature a method reads at that step (issue 25): the edit is
bit-identical to the one whose source pass runs the whole UNet, for every preset (PnP injection with the TokenFlow
and the FLATTEN preset, FLATTEN, TokenFlow), on SD1.5-, SD2- and SDXL-layout models with enough levels for the
decoder to go on past the features read; and the pass really stops there (the output blocks that ran in each
source call, counted by forward hooks through the host adapter)."""
import pytest
import torch

from tve.tests.hosts import FAMILIES, make_conditioning, make_latent, make_tiny_model

pytestmark = pytest.mark.real_host

# Real layouts, shrunk: SD1.5 / SD2 with 4 levels and no attention at the lowest resolution; SDXL with 3 levels and
# none at the latent resolution (depth 2 below it).
LAYOUTS = {
    "sd15": dict(channel_mult=[1, 2, 2, 2], num_res_blocks=[1, 1, 1, 1], transformer_depth=[1, 1, 1, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 0, 0]),
    "sdxl": dict(channel_mult=[1, 2, 2], num_res_blocks=[1, 1, 1], transformer_depth=[0, 2, 2],
                 transformer_depth_output=[0, 0, 2, 2, 2, 2]),
}
LAYOUTS["sd2"] = LAYOUTS["sd15"]
PRESETS = ("pnp-tokenflow", "pnp-flatten", "flatten", "tokenflow")
FRAMES, STEPS = 4, 4              # attention injection at steps 0-1, ResBlock injection at 0-2, nothing read at 3


def model_of(family):
    return make_tiny_model(family, **LAYOUTS[family])


def edit_model(family, preset):
    """The model ``preset`` edits with, its inversion and x_T."""
    from tve.engine.injection import apply_feature_injection
    from tve.engine.inversion import invert
    from tve.nodes.edit_nodes import ApplyTokenFlow
    from tve.tests.test_flatten_node import apply as apply_flatten, trajectories_for
    model = model_of(family)
    if preset == "flatten":
        model = apply_flatten(model, trajectories_for(FRAMES))
    x_T, inversion = invert(model, make_latent(FRAMES, 8, 8)["samples"], make_conditioning(family, seed=1), STEPS,
                            "ddim_uniform")
    if preset in ("tokenflow", "tokenflow-official"):
        propagation = "official" if preset == "tokenflow-official" else "paper"
        return ApplyTokenFlow.execute(model, inversion, 2, 7, propagation, 0.5, 0.75).result[0], inversion, x_T
    block_preset = "tokenflow" if preset == "pnp-tokenflow" else "flatten"
    return apply_feature_injection(model, inversion, 0.5, 0.75, block_preset, "sigma-matched"), inversion, x_T


def edit(model, x_T, sigmas, family):
    from tve.engine import host
    return host.sample(model, torch.zeros_like(x_T), 4.0, "euler", sigmas, make_conditioning(family, 5),
                       make_conditioning(family, 6), x_T)


class PointsRun:
    """Per UNet call (a DIFFUSION_MODEL wrapper notes its pass), the points of the UNet that ran, in the order they
    ran: each output block's ResBlock branch (forward hooks, ``host.resblock_branch``) and each transformer block's
    self-attention (a patch right after it, ``host.set_middle_patch``), as ``methods.resblock_point`` /
    ``methods.tokens_point`` name them."""

    def __init__(self, model):
        from tve.engine import host
        from tve.engine.methods import resblock_point
        self.calls: list[tuple[str, list]] = []
        self.hooks = {host.resblock_branch(model, i): self.ran(resblock_point(i)) for i in range(outputs(model))}
        host.set_middle_patch(model, self.attended)
        host.add_wrapper(model, host.DIFFUSION_MODEL, "test_points_run", self)

    def __deepcopy__(self, memo):
        return self                    # one recorder, however the host copies a clone's wrappers (0.3.64 does)

    def __call__(self, executor, x, *args, **kwargs):
        from tve.engine.run import current_pass
        self.calls.append((current_pass(args[4]).value, []))
        return executor(x, *args, **kwargs)

    def ran(self, point):
        return lambda h: self.calls[-1][1].append(point)

    def attended(self, x, extra_options):
        from tve.engine import host
        from tve.engine.methods import tokens_point
        self.calls[-1][1].append(tokens_point(host.block_key(extra_options)))
        return x

    def of(self, pass_):
        return [points for name, points in self.calls if name == pass_]


def outputs(model):
    from tve.engine import host
    return sum(len(stage) for stage in host.decoder_stages(model))


def last_read(model, step):
    """The last point of a UNet call whose feature the model's methods read at ``step``."""
    from tve.engine.stack import stack_of
    return stack_of(model).source_reads(step, STEPS).last_point()


def ran_until(points, last):
    """The points of a whole call (``points``) that run when it ends right after ``last`` is computed: a ResBlock
    read runs, a self-attention input read ends the call before that self-attention."""
    return [p for p in points if p < last or (p == last and p[2] == -1)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_an_edit_is_bit_identical_with_and_without_ending_the_source_pass_early(family, preset):
    from tve.engine import host
    from tve.engine.stack import with_full_source_pass
    model, inversion, x_T = edit_model(family, preset)
    full = with_full_source_pass(model)
    ran = PointsRun(model)
    with host.forward_hooks(ran.hooks):
        ended = edit(model, x_T, inversion.sigmas, family)
    reference = edit(full, x_T, inversion.sigmas, family)
    assert torch.equal(ended, reference)
    whole = ran.of("edit")[0]
    assert all(len(points) < len(whole) for points in ran.of("source"))        # every source call ended early


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("preset", PRESETS)
def test_each_source_call_stops_right_after_the_last_feature_read_and_runs_whole_without(family, preset):
    from tve.engine import host
    from tve.engine.stack import with_full_source_pass
    model, inversion, x_T = edit_model(family, preset)
    for patched, ends in ((model, True), (with_full_source_pass(model), False)):
        ran = PointsRun(patched)
        with host.forward_hooks(ran.hooks):
            edit(patched, x_T, inversion.sigmas, family)
        whole = ran.of("edit")[0]
        assert whole == sorted(whole) and all(points == whole for points in ran.of("edit"))
        steps = [step for step in range(STEPS) if last_read(model, step) is not None]
        expected = [ran_until(whole, last_read(model, step)) if ends else whole for step in steps]
        assert ran.of("source") == expected
    if preset != "tokenflow":                  # TokenFlow reads every block's tokens at every step
        assert steps == [0, 1, 2] and last_read(model, 2) <= last_read(model, 0)    # no more once attention ends


def test_tokenflow_official_source_calls_run_whole_as_it_reads_every_self_attention_output():
    """The keyframes' source outputs it propagates and the fields its propagated source branch takes in the
    self-attention slot are read up to the last block's attention: no source call may end before it."""
    from tve.engine import host
    from tve.engine.stack import with_full_source_pass
    model, inversion, x_T = edit_model("sd15", "tokenflow-official")
    full = with_full_source_pass(model)
    ran = PointsRun(model)
    with host.forward_hooks(ran.hooks):
        ended = edit(model, x_T, inversion.sigmas, "sd15")
    whole, sources = ran.of("edit")[0], ran.of("source")
    assert len(sources) == 2 * STEPS and all(points == whole for points in sources)   # per step: keyframes, propagated
    assert torch.equal(ended, edit(full, x_T, inversion.sigmas, "sd15"))


def test_reads_order_as_the_unet_computes_them():
    from tve.engine.methods import SourceReads
    assert SourceReads().last_point() is None
    assert SourceReads(tokens=frozenset({("input", 4, 0)}), outputs=frozenset({("input", 4, 0)})).last_point() is None
    reads = SourceReads(tokens=frozenset({("input", 4, 0), ("middle", 0, 1), ("output", 3, 0)}),
                        resblocks=frozenset({3}))
    assert reads.last_point() == (2, 3, 0)                      # output block 3's transformer after its ResBlock
    assert SourceReads(tokens=frozenset({("output", 3, 1)}), resblocks=frozenset({4})).last_point() == (2, 4, -1)
    assert SourceReads(tokens=frozenset({("middle", 0, 0), ("input", 8, 1)})).last_point() == (1, 0, 0)
