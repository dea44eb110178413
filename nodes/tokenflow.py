"""TVE_ApplyTokenFlow: keyframe editing with nearest-neighbour propagation of diffusion features.

TokenFlow (Geyer et al., ICLR 2024), per denoising step (§3.2–3.3, Alg. 1):
  1. one random keyframe per window of ``interval`` frames, re-drawn every step;
  2. source pass: the inverted source at this σ; every block's normed self-attention input is kept (NN field);
  3. keyframe pass: the keyframes only, with extended attention among them and PnP injection; every block's
     self-attention output is kept;
  4. full pass: every frame; each block's self-attention output is replaced by the keyframe outputs gathered
     through the nearest-neighbour field of the source tokens and blended between the two nearest keyframes
     (self-attention itself is never computed for the full pass). Its output is the step's result.
Runs inside the live source branch (``passes.py``), so core context windows, memory-split cond batches and
any core sampler work unchanged.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from ..attention.cross_frame import dense_attention, pick_keyframes
from ..attention.frames import frames_view
from ..attention.tokenflow import PROPAGATION_MODES, pair_nearest_neighbour_field, propagate, propagation_weights
from . import host, sockets
from .injection import install_feature_injection
from .inversion import Inversion
from .passes import SourceBranch, install_source_branch, with_pass

CATEGORY = "video editing/TVE"


class TokenFlow:
    """Patches and the keyframe pass of one TokenFlow MODEL; shared by its clones."""

    def __init__(self, branch: SourceBranch, interval: int, seed: int, mode: str,
                 inner: Mapping[tuple, Callable]):
        self.branch, self.interval, self.seed, self.mode = branch, interval, seed, mode
        self.inner = dict(inner)                 # replaces already on the model, used for the keyframe pass
        self.keyframes = torch.zeros(0, dtype=torch.long)       # local indices into the call's frames

    def __deepcopy__(self, memo: dict) -> "TokenFlow":
        return self

    # ------------------------------------------------------------------------------------------ passes
    def keyframe_pass(self, executor: Callable, model: Any, conds: list, x_in: torch.Tensor, timestep: torch.Tensor,
                      model_options: dict) -> None:
        branch = self.branch
        frame_ids = branch.frame_ids
        keyframes = pick_keyframes(frame_ids, self.interval, self.seed, branch.step)
        # In global-id order: a looped context window lists frames 28..31, 0..3.
        self.keyframes = keyframes[torch.argsort(torch.tensor([frame_ids[i] for i in keyframes.tolist()]))]
        local = self.keyframes.to(x_in.device)
        keyframe_conds = [slice_conds(c, self.keyframes, x_in.shape[0]) for c in conds]
        branch.pass_name, branch.pass_frames = "keyframes", self.keyframes
        try:
            executor(model, keyframe_conds, x_in[local], timestep[local],
                     with_pass(model_options, "keyframes", [frame_ids[i] for i in self.keyframes.tolist()]))
        finally:
            branch.pass_name, branch.pass_frames = None, None

    # ------------------------------------------------------------------------------------------ patches
    def record_source_tokens(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor,
                             extra_options: dict):
        """attn1_patch: keep the source pass's normed self-attention input of every block, (F, T, C)."""
        if extra_options.get("tve_pass") == "source":
            self.branch.features[("tokens", *extra_options["block"], extra_options["block_index"])] = n
        return n, context, value

    def replace(self, key: tuple) -> Callable:
        inner = self.inner.get(key)

        def attn1(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
            pass_name = extra_options.get("tve_pass")
            if pass_name == "keyframes":
                out = self._keyframe_attention(q, k, v, extra_options, inner)
                for uuid, chunk in zip(extra_options["uuids"], frames_view(out, len(extra_options["uuids"]))):
                    self.branch.features[("keyframe_out", key, uuid)] = chunk           # (K, T, C)
                return out
            if pass_name == "edit":
                return self._propagated(key, extra_options).to(q.dtype)
            return inner(q, k, v, extra_options) if inner else host.optimized_attention(
                q, k, v, extra_options["n_heads"], extra_options)

        return attn1

    def _keyframe_attention(self, q, k, v, extra_options, inner) -> torch.Tensor:
        """Extended attention: every keyframe attends to all keyframes of its chunk (TokenFlow §3.2, Eq. 3)."""
        if inner is not None:
            return inner(q, k, v, extra_options)
        heads = extra_options["n_heads"]
        return dense_attention(q, k, v, heads, len(extra_options["cond_or_uncond"]),
                               attention=lambda q_, k_, v_, h_: host.optimized_attention(q_, k_, v_, h_, extra_options))

    def _propagated(self, key: tuple, extra_options: dict) -> torch.Tensor:
        """Eq. 5: the frame's tokens gathered from its two nearest keyframes through the NN field and blended."""
        branch = self.branch
        tokens_key = ("tokens", *key)
        if tokens_key not in branch.features:
            raise RuntimeError("TokenFlow: the source pass did not run for this step (is another TVE source "
                               "branch on this model?)")
        field_key = ("field", key)
        if field_key not in branch.features:            # once per step and block, shared by split cond calls
            source = branch.features[tokens_key]                                   # (F, T, C)
            frame_ids = branch.frame_ids
            keyframe_ids = [frame_ids[i] for i in self.keyframes.tolist()]
            pair, weights = propagation_weights(frame_ids, keyframe_ids, self.mode, self.interval)
            field = pair_nearest_neighbour_field(source, source[self.keyframes.to(source.device)], pair)
            branch.features[field_key] = (field, pair, weights)
        field, pair, weights = branch.features[field_key]
        keyframe_out = torch.stack([branch.features[("keyframe_out", key, uuid)]
                                    for uuid in extra_options["uuids"]])           # (chunks, K, T, C)
        out = propagate(keyframe_out, field, pair, weights)                        # (chunks, F, T, C)
        return out.reshape(-1, *out.shape[2:])


def slice_conds(conds: list[dict] | None, local: torch.Tensor, frames: int) -> list[dict] | None:
    """The cond dicts of a call restricted to some of its frames: per-frame tensors (batch == frames) follow
    the frames; ControlNet hints cannot be re-sliced here, so a ControlNet is refused with a clear error."""
    if conds is None:
        return None
    out = []
    for cond in conds:
        if cond.get("control") is not None:
            raise ValueError("TokenFlow: ControlNet is not supported yet (its hint batch cannot follow the random "
                             "keyframes); apply ControlNet without TokenFlow, or use cross-frame attention")
        sliced = dict(cond)
        model_conds = {}
        for name, value in cond.get("model_conds", {}).items():
            tensor = getattr(value, "cond", None)
            if isinstance(tensor, torch.Tensor) and tensor.ndim > 0 and tensor.shape[0] == frames > 1:
                value = value._copy_with(tensor[local.to(tensor.device)])
            model_conds[name] = value
        sliced["model_conds"] = model_conds
        out.append(sliced)
    return out


def apply_tokenflow(model: Any, inversion: Inversion, interval: int, seed: int, mode: str, attn_end: float,
                    conv_end: float) -> Any:
    if interval < 1:
        raise ValueError(f"keyframe_interval: must be at least 1, got {interval}")
    if mode not in PROPAGATION_MODES:
        raise ValueError(f"propagation: expected one of {PROPAGATION_MODES}, got '{mode}'")
    inversion.check_model(model)
    blocks = host.attention_blocks(model)
    existing = host.attn1_replaces(model)
    if any(getattr(fn, "tve_tokenflow", False) for fn in existing.values()):
        raise ValueError("model: TokenFlow is already applied to this model")
    m = model.clone()
    branch = SourceBranch(inversion, "sigma-matched")
    tokenflow = TokenFlow(branch, interval, seed, mode, {b.key: existing[b.key] for b in blocks if b.key in existing})
    install_feature_injection(m, branch, "tokenflow", attn_end, conv_end)
    m.set_model_attn1_patch(tokenflow.record_source_tokens)
    for block in blocks:
        fn = tokenflow.replace(block.key)
        fn.tve_tokenflow = True
        m.set_model_attn1_replace(fn, *block.key)
    branch.extra_passes.append(tokenflow.keyframe_pass)
    install_source_branch(m, branch)
    return m


class ApplyTokenFlow:
    DESCRIPTION = ("TokenFlow: edits random keyframes jointly each step and carries their self-attention outputs to "
                   "every frame along nearest-neighbour correspondences of the source video's features, with PnP "
                   "injection. Sample the inverted latent on the inversion's σ grid (SamplerCustomAdvanced with "
                   "DisableNoise and the inversion's SIGMAS). Apply it after FLATTEN or cross-frame attention.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": (
                "The model you edit with (patch FLATTEN or cross-frame attention first if you stack them).")}),
            "inversion": (sockets.INVERSION, {"tooltip": "From DDIM Inversion (TVE) of the same frames, with this model."}),
            "keyframe_interval": ("INT", {"default": 8, "min": 1, "max": 1024,
                                          "tooltip": "One keyframe per this many frames (re-drawn every step)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": False,
                             "tooltip": "Seeds the keyframe draw (re-drawn every step). Fixed: it does not re-roll on "
                                        "every queue, so the inversion and the edit are not re-run."}),
            "propagation": (list(PROPAGATION_MODES), {"default": "paper", "tooltip": (
                "paper: blend the two keyframes nearest in time, linear in their distance. official: the reference "
                "code's rule (current and previous window, sigmoid weights).")}),
            "attention_injection_end": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "Fraction of the steps with PnP q/k injection in the keyframe pass (more keeps more of the source "
                "layout).")}),
            "conv_injection_end": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                "Fraction of the steps with PnP ResBlock feature injection in the keyframe pass.")}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, inversion: Inversion, keyframe_interval: int, seed: int, propagation: str,
              attention_injection_end: float, conv_injection_end: float):
        sockets.expect(inversion, Inversion, "inversion", sockets.INVERSION)
        return (apply_tokenflow(model, inversion, keyframe_interval, seed, propagation, attention_injection_end,
                                conv_injection_end),)


NODES = {"TVE_ApplyTokenFlow": (ApplyTokenFlow, "Apply TokenFlow (TVE)")}
