"""TVE_ApplyFeatureInjection: Plug-and-Play feature injection from the live source branch.

PnP (Tumanyan et al. 2023, §4): during the first part of sampling, the decoder's self-attention queries/keys and
one ResBlock's residual-branch features of the edit are replaced by the source's at the same step. Presets:
TokenFlow's (q/k of every decoder transformer block but the first, conv of the second ResBlock of the second
decoder stage, run_tokenflow_pnp.py) and FLATTEN's (peers.md §2.2). Blocks are mapped by decoder stage, so the
presets fit SD1.x, SD2.x and SDXL alike.
"""
from __future__ import annotations

from typing import Any


from . import host, passes, sockets, validation
from .inversion import Inversion

CATEGORY = "video editing/TVE"
PRESETS = ["tokenflow", "flatten"]
ORDERS = ["sigma-matched", "clean-first"]


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


def injection_settings(model: Any, inversion: Inversion, preset: str, attn_end: float, conv_end: float,
                       order: str, node: str = passes.INJECTION_NODE) -> passes.Injection:
    """The PnP settings of ``preset`` on ``model``'s blocks, for the model's TVE state."""
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got '{order}'")
    inversion.check_model(model)
    attn_blocks, conv_ids = injection_targets(model, preset)
    return passes.Injection(node=node, inversion=inversion, attn_keys=frozenset(b.key for b in attn_blocks),
                            conv_ids=tuple(conv_ids), attn_end=attn_end, conv_end=conv_end, order=order)


def apply_feature_injection(model: Any, inversion: Inversion, attn_end: float, conv_end: float, preset: str,
                            order: str) -> Any:
    """PnP injection on a clone of ``model``: q/k through the state's attn1 patch, ResBlock features through its
    per-run hooks, both read from the state's one source pass per step. Applied again, or on a TokenFlow model,
    these settings replace the earlier ones."""
    validation.model(model)
    validation.number(attn_end, "attention_injection_end", 0.0, 1.0)
    validation.number(conv_end, "conv_injection_end", 0.0, 1.0)
    validation.choice(preset, "block_preset", PRESETS)
    validation.choice(order, "order", ORDERS)
    injection = injection_settings(model, inversion, preset, attn_end, conv_end, order)
    return passes.apply(model, lambda state: state.with_injection(injection))


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
                "Which decoder blocks are injected: TokenFlow's (q/k of all decoder transformers but the first, the "
                "second ResBlock of the second decoder stage) or FLATTEN's.")}),
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
