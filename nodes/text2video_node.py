"""Motion Dynamics Latents (TVE): a node class over ``engine/motion_dynamics.py`` (Text2Video-Zero §3.1)."""
from __future__ import annotations

from comfy_api.latest import io

from ..engine import host, identity
from ..engine.motion_dynamics import OFFICIAL_MOTION, motion_dynamics_latents
from .schema import schema


def motion(name: str) -> io.Float.Input:
    """One axis of the scene's translation per frame."""
    return io.Float.Input(name, default=OFFICIAL_MOTION, min=-64.0, max=64.0, step=0.1, tooltip=(
        "Translation of the scene per frame in latent cells (8 px), + is right/down. The official default is -1.5 at "
        "512 px (12/512 of the frame per frame): -3 at 1024 px. Rounded to whole cells per frame."))


class MotionDynamicsLatents(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.MOTION_DYNAMICS, (
            "Text2Video-Zero motion dynamics: denoises one noise latent to step t0, copies it to every frame "
            "translated by k·motion for frame k, re-noises to t1 and returns the frames at t1. Sample them with "
            "anchor cross-frame attention: SamplerCustomAdvanced (DisableNoise, the SIGMAS output) or "
            "KSamplerAdvanced (add_noise disable, same steps and scheduler, start_at_step)."), [
            io.Model.Input("model", tooltip="The model that denoises frame 0 to t1 and t0."),
            io.Conditioning.Input("positive", tooltip="The prompt of the video."),
            io.Conditioning.Input("negative", tooltip="The negative prompt."),
            io.Latent.Input("latent", tooltip="An empty latent giving the size; its batch is ignored."),
            io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                         tooltip="The noise of x_T (one noise for the whole video)."),
            io.Int.Input("frames", default=8, min=1, max=4096, tooltip="Frames of the video."),
            motion("motion_x"),
            motion("motion_y"),
            io.Int.Input("steps", default=50, min=2, max=1000,
                         tooltip="Sampling steps of the whole video; t0 and t1 count on this grid."),
            io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                           tooltip="Classifier-free guidance while frame 0 is denoised to t1 and t0."),
            io.Combo.Input("scheduler", options=host.scheduler_names(), default="ddim_uniform",
                           tooltip="The σ grid (ddim_uniform = the paper's DDIM)."),
            io.Int.Input("t0", default=44, min=0, max=999,
                         tooltip="Step index (counted from the clean end) where frame 0 is copied and warped."),
            io.Int.Input("t1", default=47, min=1, max=999, tooltip=(
                "Step index (counted from the clean end) the frames are re-noised to; t0 < t1 ≤ steps − 1.")),
        ], [io.Latent.Output(display_name="latent"), io.Sigmas.Output(display_name="sigmas"),
            io.Int.Output(display_name="start_at_step")])

    @classmethod
    def execute(cls, model, positive: list, negative: list, latent: dict, seed: int, frames: int, motion_x: float,
                motion_y: float, steps: int, cfg: float, scheduler: str, t0: int, t1: int) -> io.NodeOutput:
        result = motion_dynamics_latents(model, positive, negative, latent, seed, frames, motion_x, motion_y, steps,
                                         cfg, scheduler, t0, t1)
        return io.NodeOutput({"samples": result.raw_latents}, result.sigmas, result.start_step)


NODES = {identity.MOTION_DYNAMICS: MotionDynamicsLatents}
