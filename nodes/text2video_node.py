"""Motion Dynamics Latents (TVE): a node class over ``engine/motion_dynamics.py`` (Text2Video-Zero §3.1)."""
from __future__ import annotations

from ..engine import host, identity
from ..engine.motion_dynamics import OFFICIAL_MOTION, motion_dynamics_latents

CATEGORY = "video editing/TVE"


class MotionDynamicsLatents:
    DESCRIPTION = ("Text2Video-Zero motion dynamics: denoises one noise latent to step t0, copies it to every frame "
                   "translated by k·motion for frame k, re-noises to t1 and returns the frames at t1. Sample them "
                   "with anchor cross-frame attention: SamplerCustomAdvanced (DisableNoise, the SIGMAS output) or "
                   "KSamplerAdvanced (add_noise disable, same steps and scheduler, start_at_step).")

    @classmethod
    def INPUT_TYPES(cls):
        motion = {"default": OFFICIAL_MOTION, "min": -64.0, "max": 64.0, "step": 0.1,
                  "tooltip": "Translation of the scene per frame in latent cells (8 px), + is right/down. The "
                             "official default is -1.5 at 512 px (12/512 of the frame per frame): -3 at 1024 px. "
                             "Rounded to whole cells per frame."}
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model that denoises frame 0 to t1 and t0."}),
            "positive": ("CONDITIONING", {"tooltip": "The prompt of the video."}),
            "negative": ("CONDITIONING", {"tooltip": "The negative prompt."}),
            "latent": ("LATENT", {"tooltip": "An empty latent giving the size; its batch is ignored."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                             "tooltip": "The noise of x_T (one noise for the whole video)."}),
            "frames": ("INT", {"default": 8, "min": 1, "max": 4096, "tooltip": "Frames of the video."}),
            "motion_x": ("FLOAT", dict(motion)),
            "motion_y": ("FLOAT", dict(motion)),
            "steps": ("INT", {"default": 50, "min": 2, "max": 1000,
                              "tooltip": "Sampling steps of the whole video; t0 and t1 count on this grid."}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance while frame 0 is denoised to t1 and t0."}),
            "scheduler": (host.scheduler_names(), {"default": "ddim_uniform",
                                                   "tooltip": "The σ grid (ddim_uniform = the paper's DDIM)."}),
            "t0": ("INT", {"default": 44, "min": 0, "max": 999,
                           "tooltip": "Step index (counted from the clean end) where frame 0 is copied and warped."}),
            "t1": ("INT", {"default": 47, "min": 1, "max": 999,
                           "tooltip": "Step index (counted from the clean end) the frames are re-noised to; "
                                      "t0 < t1 ≤ steps − 1."}),
        }}

    RETURN_TYPES = ("LATENT", "SIGMAS", "INT")
    RETURN_NAMES = ("latent", "sigmas", "start_at_step")
    FUNCTION = "make"
    CATEGORY = CATEGORY

    def make(self, model, positive: list, negative: list, latent: dict, seed: int, frames: int, motion_x: float,
             motion_y: float, steps: int, cfg: float, scheduler: str, t0: int, t1: int):
        result = motion_dynamics_latents(model, positive, negative, latent, seed, frames, motion_x, motion_y, steps,
                                         cfg, scheduler, t0, t1)
        return {"samples": result.raw_latents}, result.sigmas, result.start_step


NODES = {identity.MOTION_DYNAMICS: MotionDynamicsLatents}
