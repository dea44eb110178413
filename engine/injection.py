"""Plug-and-Play feature injection from the live source branch (Tumanyan et al. 2023, §4), a method of the engine.

During the first part of sampling, the decoder's self-attention queries/keys and one ResBlock's residual-branch
features of the edit (and of TokenFlow's keyframe pass) are replaced by the source's at the same step, read from the
step's source pass. Presets: TokenFlow's (q/k of every decoder transformer block but the first, conv of the second
ResBlock of the second decoder stage, run_tokenflow_pnp.py) and FLATTEN's (peers.md §2.2). Blocks are mapped by
decoder stage, so the presets fit SD1.x, SD2.x and SDXL alike. One injection per model: applied again, or by
TokenFlow (which carries its own), the later settings win.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from . import host, identity, validation
from .methods import BlockKey, Method, SourceReads
from .run import Pass
from .stack import apply

if TYPE_CHECKING:
    from .inversion import Inversion
    from .run import SamplingRun

PRESETS = ["tokenflow", "flatten"]
ORDERS = ["sigma-matched", "clean-first"]


@dataclass(frozen=True, eq=False)
class Injection(Method):
    """PnP settings: where and until when the source's q/k and ResBlock features replace the edit's, and which
    source latent each step reads. ``node`` is Apply Feature Injection (TVE) or Apply TokenFlow (TVE)."""
    node: identity.Node
    inversion: "Inversion" = field()           # required: Method.inversion is a default of None
    attn_keys: frozenset
    conv_ids: tuple[int, ...]
    attn_end: float
    conv_end: float
    source_order: str = "sigma-matched"
    allow_other_weights: bool = False
    what = "PnP injection settings"

    def sources(self) -> list:
        return [self.inversion]

    def attn_active(self, step: int, steps: int) -> bool:
        return step < int(steps * self.attn_end)

    def conv_active(self, step: int, steps: int) -> bool:
        return step < int(steps * self.conv_end)

    def source_reads(self, step: int, steps: int) -> SourceReads:
        return SourceReads(self.attn_keys if self.attn_active(step, steps) else frozenset(),
                           frozenset(self.conv_ids) if self.conv_active(step, steps) else frozenset())

    def attention_input(self, key: BlockKey, n: torch.Tensor, run: "SamplingRun") -> torch.Tensor | None:
        """q and k from the source's tokens of the same frames (Eq. 4), every cond chunk."""
        if key not in self.attn_keys or not self.attn_active(run.step, run.steps):
            return None
        source = run.source.tokens.get(key)
        if source is None:
            return None
        source = run.source_at_pass(source)                                          # (F, T, C)
        return source.repeat(n.shape[0] // source.shape[0], 1, 1)                     # (chunks·F, T, C)

    def run_hooks(self, model: Any, run: "SamplingRun") -> Mapping[torch.nn.Module, Callable]:
        """The residual-branch output of each injected ResBlock: kept in the source pass, given to the edit and
        keyframe passes."""
        return {host.resblock_branch(model, i): self._resblock_hook(i, run) for i in self.conv_ids}

    def _resblock_hook(self, block_id: int, run: "SamplingRun") -> Callable[[torch.Tensor], torch.Tensor | None]:
        def hook(h: torch.Tensor) -> torch.Tensor | None:
            if not self.conv_active(run.step, run.steps):
                return None
            if run.pass_ is Pass.SOURCE:
                run.keep_source_resblock(block_id, h)                                 # (F, C, h, w)
            elif run.pass_ in (Pass.EDIT, Pass.KEYFRAMES) and block_id in run.source.resblocks:
                source = run.source_at_pass(run.source.resblocks[block_id])
                return source.repeat(h.shape[0] // source.shape[0], 1, 1, 1)          # (chunks·F, C, h, w)
            return None

        return hook


def injection_targets(model: Any, preset: str) -> tuple[list[host.AttentionBlock], list[int]]:
    """(self-attention blocks whose q/k are injected, output block ids whose ResBlock features are injected)."""
    validation.choice(preset, "block_preset", PRESETS)
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


def injection(model: Any, inversion: "Inversion", preset: str, attn_end: float, conv_end: float, order: str,
              node: identity.Node = identity.FEATURE_INJECTION, allow_other_weights: bool = False) -> Injection:
    """The PnP settings of ``preset`` on ``model``'s blocks (checked: the inversion fits the model; its weights,
    when the stack applies it)."""
    validation.number(attn_end, "attention_injection_end", 0.0, 1.0)
    validation.number(conv_end, "conv_injection_end", 0.0, 1.0)
    validation.choice(order, "order", ORDERS)
    validation.boolean(allow_other_weights, "allow_other_weights")
    validation.inversion_fits_model(inversion, model)
    attn_blocks, conv_ids = injection_targets(model, preset)
    return Injection(node=node, inversion=inversion, attn_keys=frozenset(b.key for b in attn_blocks),
                     conv_ids=tuple(conv_ids), attn_end=attn_end, conv_end=conv_end, source_order=order,
                     allow_other_weights=allow_other_weights)


def apply_feature_injection(model: Any, inversion: "Inversion", attn_end: float, conv_end: float, preset: str,
                            order: str, allow_other_weights: bool = False) -> Any:
    """PnP injection on a clone of ``model``; applied again, or on a TokenFlow model, these settings replace the
    earlier ones (the stack's notes say so). A model of other weights than the inversion's is refused unless
    ``allow_other_weights`` (then a note says so)."""
    validation.model(model)
    return apply(model, injection(model, inversion, preset, attn_end, conv_end, order,
                                  allow_other_weights=allow_other_weights))
