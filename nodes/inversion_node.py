"""DDIM Inversion (TVE): a node class over ``engine/inversion.py``."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..engine import host, identity
from ..engine.inversion import DEFAULT_FORMULA, FORMULAS, invert_latent
from .schema import Inversion, schema


class DDIMInversion(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.DDIM_INVERSION, (
            "Deterministic DDIM inversion (guidance 1) of the VAE-encoded frames with your model: returns the "
            "inverted latent x_T, the INVERSION (the source at every σ, for injection and TokenFlow) and the σ grid "
            "to sample with (KSamplerAdvanced with add_noise disabled, or SamplerCustomAdvanced with DisableNoise). "
            "Patches on the model (e.g. FLATTEN) are active."), [
            io.Model.Input("model", tooltip=(
                "The model you will edit with (with FLATTEN applied if you use it: the paper inverts with it).")),
            io.Latent.Input("latent", tooltip="The VAE-encoded source frames."),
            io.Conditioning.Input("conditioning",
                                  tooltip="The source prompt (an empty prompt is the usual choice)."),
            io.Int.Input("steps", default=50, min=2, max=1000, tooltip=(
                "Sampling steps of the edit; sample it with the SIGMAS output (the same grid). 50 is the papers' "
                "choice.")),
            io.Combo.Input("scheduler", options=host.scheduler_names(), default="ddim_uniform", tooltip=(
                "The σ grid: ddim_uniform is DDIM's timesteps (the papers); any core scheduler works.")),
            io.Int.Input("inversion_multiple", default=1, min=1, max=50, tooltip=(
                "Inversion steps per sampling step: the inversion walks steps × this many steps (the papers invert "
                "with 10×: TokenFlow 500 for 50) for a more faithful x_T, and keeps the source only at the sampling "
                "grid's σ, so the edit still samples the SIGMAS output (steps steps).")),
            io.Combo.Input("formula", options=list(FORMULAS), default=DEFAULT_FORMULA, optional=True, tooltip=(
                "Where each inversion step evaluates the model's noise estimate ε. next_sigma (default): at the next, "
                "noisier level σ_{i+1} the step goes to, on the same latent (TokenFlow's code); closer to the exact "
                "inverse of a DDIM step: the frames reconstruct about 2× more faithfully at the same steps. "
                "current_sigma: at the latent's own level σ_i (FLATTEN's code; the first step at the model's "
                "smallest σ).")),
        ], [io.Latent.Output(display_name="inverted_latent"), Inversion.Output(display_name="inversion"),
            io.Sigmas.Output(display_name="sigmas")])

    @classmethod
    def execute(cls, model, latent: dict, conditioning: list, steps: int, scheduler: str, inversion_multiple: int = 1,
                formula: str = DEFAULT_FORMULA) -> io.NodeOutput:
        x_T, inversion = invert_latent(model, latent, conditioning, steps, scheduler, inversion_multiple, formula)
        # noise_mask and batch_index stay on the LATENT: a masked edit samples x_T with the source's mask.
        shown = None
        if inversion.stored is not None:                                   # what FLATTEN's stored mode holds
            note = f"{identity.DDIM_INVERSION}: {inversion.stored.describe(inversion.frames, inversion.steps)}"
            logging.info("[TVE] %s", note)
            shown = {"text": [note]}
        return io.NodeOutput({**latent, "samples": x_T}, inversion, inversion.sigmas.clone(), ui=shown)


NODES = {identity.DDIM_INVERSION: DDIMInversion}
