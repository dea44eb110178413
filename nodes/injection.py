"""TVE_ApplyFeatureInjection: Plug-and-Play feature injection from the live source branch.

PnP (Tumanyan et al. 2023, §4): during the first part of sampling, the decoder's self-attention queries/keys and
one ResBlock's residual-branch features of the edit are replaced by the source's at the same step. Presets:
TokenFlow's (q/k of every decoder transformer block but the first, conv of the second ResBlock of the second
decoder stage, run_tokenflow_pnp.py) and FLATTEN's (peers.md §2.2). Blocks are mapped by decoder stage, so the
presets fit SD1.x, SD2.x and SDXL alike.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from . import host, sockets
from .inversion import Inversion
from .passes import ORDERS, SourceBranch, install_source_branch

CATEGORY = "video editing/TVE"
PRESETS = ["tokenflow", "flatten"]
INJECTED_PASSES = ("edit", "keyframes")


def injection_targets(model: Any, preset: str) -> tuple[list[host.AttentionBlock], list[int]]:
    """(self-attention blocks whose q/k are injected, output block ids whose ResBlock features are injected)."""
    if preset not in PRESETS:
        raise ValueError(f"block_preset: expected one of {PRESETS}, got '{preset}'")
    stages = host.decoder_stages(model)
    decoder = [b for b in host.attention_blocks(model) if b.key[0] == "output"]
    with_attention = sorted({b.key[1] for b in decoder})
    if len(stages) < 2 or not with_attention:
        raise ValueError("model: its UNet has too few decoder stages for PnP injection; TVE supports SD1.x, SD2.x "
                         "and SDXL models")
    if preset == "tokenflow":
        attn_ids = set(with_attention[1:])                       # all but the first decoder transformer
        conv_ids = [stages[1][min(1, len(stages[1]) - 1)]]       # second ResBlock of the second decoder stage
    else:                                                        # FLATTEN: up1.attn[1,2], up2.attn[*], up3.attn[0]
        picks = {1: slice(1, None), 2: slice(None), 3: slice(0, 1)}
        attn_ids = {i for s, sl in picks.items() if s < len(stages)
                    for i in [b for b in stages[s] if b in with_attention][sl]}
        conv_ids = [i for s, n in ((1, 0), (1, 1), (2, 0)) if s < len(stages) and n < len(stages[s])
                    for i in [stages[s][n]]]
    return [b for b in decoder if b.key[1] in attn_ids], conv_ids


class FeatureInjection:
    """The patches: attn1_patch (q/k from the source's normed tokens) and ResBlock forward hooks (conv features)."""

    def __init__(self, branch: SourceBranch, attn_blocks: list[host.AttentionBlock], conv_ids: list[int],
                 attn_end: float, conv_end: float):
        self.branch = branch
        self.attn_keys = {b.key for b in attn_blocks}
        self.conv_ids = conv_ids
        self.attn_end, self.conv_end = attn_end, conv_end

    def __deepcopy__(self, memo: dict) -> "FeatureInjection":
        return self

    def attn_active(self, step: int, steps: int) -> bool:
        return step < int(steps * self.attn_end)

    def conv_active(self, step: int, steps: int) -> bool:
        return step < int(steps * self.conv_end)

    def wants_source(self, step: int, steps: int) -> bool:
        return self.attn_active(step, steps) or self.conv_active(step, steps)

    def attn1_patch(self, n: torch.Tensor, context: torch.Tensor, value: torch.Tensor, extra_options: dict):
        """Before projection: q = to_q(n_src), k = to_k(n_src), v = to_v(n) — PnP's q/k injection (Eq. 4)."""
        key = (*extra_options["block"], extra_options["block_index"])
        if key not in self.attn_keys:
            return n, context, value
        branch, pass_name = self.branch, extra_options.get("tve_pass")
        if pass_name == "source" and self.attn_active(branch.step, branch.steps):
            branch.features[key] = n                                     # (F, T, C)
        elif pass_name in INJECTED_PASSES and key in branch.features:
            source = branch.source_frames(branch.features[key])
            source = source.repeat(n.shape[0] // source.shape[0], 1, 1)  # (chunks·F, T, C)
            return source, source, value
        return n, context, value

    def conv_hook(self, block_id: int) -> Callable:
        key = ("resblock", block_id)

        def hook(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
            branch = self.branch
            if branch.pass_name == "source" and self.conv_active(branch.step, branch.steps):
                branch.features[key] = output                                          # (F, C, h, w)
            elif branch.pass_name in INJECTED_PASSES and key in branch.features:
                source = branch.source_frames(branch.features[key])
                return source.repeat(output.shape[0] // source.shape[0], 1, 1, 1)       # (chunks·F, C, h, w)
            return None

        return hook

    def outer_sample(self, executor: Callable, *args: Any, **kwargs: Any) -> Any:
        """Hook the chosen ResBlocks for this run only; nothing stays on the shared UNet afterwards."""
        patcher = executor.class_obj.model_patcher
        handles = [host.resblock_branch(patcher, i).register_forward_hook(self.conv_hook(i)) for i in self.conv_ids]
        try:
            return executor(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


def install_feature_injection(m: Any, branch: SourceBranch, preset: str, attn_end: float, conv_end: float
                              ) -> FeatureInjection:
    """Add the injection patches reading ``branch`` to the clone ``m``."""
    attn_blocks, conv_ids = injection_targets(m, preset)
    injection = FeatureInjection(branch, attn_blocks, conv_ids, attn_end, conv_end)
    m.set_model_attn1_patch(injection.attn1_patch)
    host.add_wrapper(m, host.OUTER_SAMPLE, injection.outer_sample)
    return injection


def apply_feature_injection(model: Any, inversion: Inversion, attn_end: float, conv_end: float, preset: str,
                            order: str) -> Any:
    inversion.check_model(model)
    injection_targets(model, preset)                     # refuse an unsupported model before cloning
    m = model.clone()
    branch = SourceBranch(inversion, order)
    branch.wants_source = install_feature_injection(m, branch, preset, attn_end, conv_end).wants_source
    install_source_branch(m, branch)
    return m


class ApplyFeatureInjection:
    DESCRIPTION = ("Plug-and-Play injection: for the first part of sampling, the edit's decoder self-attention "
                   "queries/keys and one ResBlock's features are taken from the source video at the same noise "
                   "level (a live source pass each step), which keeps layout and motion. Sample the inverted "
                   "latent on the inversion's σ grid.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The model you edit with; it must be the one the inversion was made with."}),
            "inversion": (sockets.INVERSION, {"tooltip": "From DDIM Inversion (TVE): the source video at every σ."}),
            "attention_injection_end": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                                  "tooltip": "Fraction of the steps with q/k injection."}),
            "conv_injection_end": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 1.0, "step": 0.01,
                                             "tooltip": "Fraction of the steps with ResBlock feature injection."}),
            "block_preset": (PRESETS, {"default": "tokenflow", "tooltip": (
                "Which decoder blocks are injected: TokenFlow's (q/k of all but the first decoder transformer, one "
                "ResBlock of the second stage) or FLATTEN's.")}),
            "order": (ORDERS, {"default": "sigma-matched", "tooltip": (
                "sigma-matched: source features at the same σ (the papers). clean-first: step i gets the features "
                "of inversion step i, cleanest first (what other ComfyUI packs do).")}),
        }}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, model, inversion: Inversion, attention_injection_end: float, conv_injection_end: float,
              block_preset: str, order: str):
        sockets.expect(inversion, Inversion, "inversion", sockets.INVERSION)
        return (apply_feature_injection(model, inversion, attention_injection_end, conv_injection_end, block_preset,
                                        order),)


NODES = {"TVE_ApplyFeatureInjection": (ApplyFeatureInjection, "Apply Feature Injection (TVE)")}
