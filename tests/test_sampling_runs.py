"""Each sampling call of a TVE model has its own run state (``SamplingRun``, made by its OUTER_SAMPLE wrapper): two
clones of one TVE model sampled in one prompt share the method stack (immutable settings) and never the run.
(ComfyUI itself cannot sample a clone while another clone of the same model is mid-step: the inner run's cleanup
detaches the shared BaseModel, so the two samplings here are one after the other, as in a prompt.)"""
import pytest
import torch

from tve.engine import host
from tve.engine.run import current_run
from tve.tests.hosts import make_tiny_model
from tve.tests.test_frame_windows import inverted, pnp, tokenflow
from tve.tests.test_tokenflow_node import edit

pytestmark = pytest.mark.real_host


class RunsSeen:
    """DIFFUSION_MODEL wrapper: the SamplingRun of every UNet call."""

    def __init__(self, model):
        self.runs = []
        host.add_wrapper(model, host.DIFFUSION_MODEL, "test_runs", self)

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        self.runs.append(current_run(transformer_options))
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


@pytest.mark.parametrize("method", ["pnp", "tokenflow"])
def test_two_clones_of_one_tve_model_sampled_in_one_prompt_each_get_their_own_run(method):
    model = make_tiny_model("sd15")
    x_T, inversion = inverted(model, 6)
    patched = pnp(model, inversion) if method == "pnp" else tokenflow(model, inversion, 3)
    alone = edit(patched.clone(), x_T, inversion.sigmas)
    first, second = patched.clone(), patched.clone()
    seen_first, seen_second = RunsSeen(first), RunsSeen(second)
    outs = [edit(m, x_T, inversion.sigmas) for m in (first, second, first)]
    assert all(torch.equal(out, alone) for out in outs)
    half = len(seen_first.runs) // 2                       # the first clone sampled twice: a run each time
    runs = [seen_first.runs[:half], seen_second.runs, seen_first.runs[half:]]
    assert all(len({id(r) for r in calls}) == 1 and calls[0] is not None for calls in runs)
    assert len({id(calls[0]) for calls in runs}) == 3
    assert host.get_attachment(first) is host.get_attachment(second)       # the settings are shared, not the run
