"""Temporal attention over the frame axis, added after a transformer block's self-attention, in two kinds.

* ``layernorm``: Tune-A-Video's temporal attention (Wu et al., ICCV 2023, "attn_temp"): LayerNorm, then multi-head
  attention along the frames at each spatial location, output projection zero-initialised, residual.
* ``stam``: EI²'s Shift-restricted Temporal Attention Module (Zhang et al., NeurIPS 2023): the LayerNorm,
  which the paper shows is what shifts the feature distribution after tuning, is replaced by **Instance
  Centering** (remove the mean, do not rescale), and every mapping is **normalised** (spectral normalisation,
  ``W / σ_max(W)``: a mapping cannot grow the variance it passes on), with one zero-initialised output gain.

In ComfyUI the frames of a clip are the batch: a block sees ``(chunks·F, T, C)`` (``chunks`` conditioning chunks,
each holding the call's F frames, T tokens per frame). Both kinds rearrange that into ``chunks·T`` sequences of F
frames, attend along them and add the result to the input; an untrained module adds exactly zero.

``TemporalAttention`` holds the trainable parameters; ``weights()`` turns them into the ``TemporalWeights`` the
functional ``temporal_attention`` uses (differentiable while tuning, computed once for editing).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .frames import frames_view, sdpa_attention

KINDS = ("stam", "layernorm")
LAYERNORM_EPS = 1e-5
SPECTRAL_EPS = 1e-12
CONVERGED_ITERATIONS = 500          # power iterations that settle σ of a fresh or finished module
MAPPINGS = ("q", "k", "v", "out")

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def instance_centering(seq: torch.Tensor) -> torch.Tensor:
    """EI²'s Instance Centering (STAM): ``x − E_f[x]``. ``seq`` (N, F, C): N instances (one spatial location of one
    chunk), each a sequence of F frames; the mean over its frames is removed per channel, the scale is kept
    (unlike LayerNorm, no division by a standard deviation and no affine map). The instance is read as the
    temporal attention's own input unit, the frame sequence of one token (as Instance Normalisation takes its
    statistics per instance and channel)."""
    if seq.ndim != 3:
        raise ValueError(f"seq: expected temporal sequences (instances, frames, channels), got {tuple(seq.shape)}")
    return seq - seq.mean(dim=1, keepdim=True)


def power_iteration(weight: torch.Tensor, u: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right singular vectors ``(u, v)`` of ``weight``'s largest singular value, refined from ``u`` (C,)
    by ``iterations`` power iterations (Miyato et al., ICLR 2018, Alg. 1); no gradient."""
    with torch.no_grad():
        w = weight.detach().float()
        u = u.float()
        v = F.normalize(w.T @ u, dim=0, eps=SPECTRAL_EPS)
        for _ in range(iterations):
            v = F.normalize(w.T @ u, dim=0, eps=SPECTRAL_EPS)
            u = F.normalize(w @ v, dim=0, eps=SPECTRAL_EPS)
    return u, v


def spectral_normalized(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``W / σ(W)`` with ``σ = uᵀ W v`` from the power iteration (Miyato et al., ICLR 2018; gradient through W
    only): a mapping of spectral norm 1, so ``‖Wx‖ ≤ ‖x‖`` (EI²'s STAM: normalised mappings bound the variance
    shift)."""
    sigma = torch.dot(u.to(weight.device, torch.float32), weight.float() @ v.to(weight.device, torch.float32))
    return (weight.float() / sigma.clamp_min(SPECTRAL_EPS)).to(weight.dtype)


@dataclass(frozen=True, eq=False)
class TemporalWeights:
    """The effective weights of one temporal attention (plain tensors, C = channels)."""
    kind: str
    heads: int
    q: torch.Tensor                          # (C, C)
    k: torch.Tensor                          # (C, C)
    v: torch.Tensor                          # (C, C)
    out: torch.Tensor                        # (C, C); stam: gain · W_o / σ_max(W_o)
    out_bias: torch.Tensor | None = None     # (C,) layernorm only
    norm_weight: torch.Tensor | None = None  # (C,) layernorm only
    norm_bias: torch.Tensor | None = None    # (C,) layernorm only

    def to(self, device: torch.device, dtype: torch.dtype) -> "TemporalWeights":
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(self, q=cast(self.q), k=cast(self.k), v=cast(self.v), out=cast(self.out),
                       out_bias=cast(self.out_bias), norm_weight=cast(self.norm_weight), norm_bias=cast(self.norm_bias))


def temporal_attention(x: torch.Tensor, chunks: int, weights: TemporalWeights,
                       attention: Attention = sdpa_attention) -> torch.Tensor:
    """``x + TemporalAttention(x)``: x (chunks·F, T, C) -> (chunks·F, T, C). Each token attends to the same token
    of every frame of its chunk (Tune-A-Video's ``(b f) d c -> (b d) f c``), with ``weights.heads`` heads."""
    x4 = frames_view(x, chunks)                                                  # (chunks, F, T, C)
    _, frames, tokens, channels = x4.shape
    if weights.q.shape != (channels, channels):
        raise ValueError(f"x: the temporal attention was made for {weights.q.shape[0]} channels but the block "
                         f"has {channels}")
    seq = x4.permute(0, 2, 1, 3).reshape(chunks * tokens, frames, channels)      # (chunks·T, F, C)
    if weights.kind == "stam":
        h = instance_centering(seq)
    else:
        h = F.layer_norm(seq, (channels,), weights.norm_weight, weights.norm_bias, LAYERNORM_EPS)
    q, k, v = (F.linear(h, w) for w in (weights.q, weights.k, weights.v))        # (chunks·T, F, C)
    mixed = F.linear(attention(q, k, v, weights.heads), weights.out, weights.out_bias)
    residual = mixed.reshape(chunks, tokens, frames, channels).permute(0, 2, 1, 3).reshape(x.shape)
    return x + residual


class TemporalAttention(nn.Module):
    """The trainable parameters of one block's temporal attention (fp32). Untrained, it adds exactly zero:
    ``layernorm`` zero-initialises the output projection (Tune-A-Video), ``stam`` its output gain."""

    def __init__(self, channels: int, heads: int, kind: str, generator: torch.Generator | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {list(KINDS)}, got '{kind}'")
        if channels < 1 or heads < 1 or channels % heads:
            raise ValueError(f"heads: expected a positive divisor of the {channels} channels, got {heads}")
        self.kind, self.channels, self.heads = kind, channels, heads
        bound = channels ** -0.5                                                 # nn.Linear's default range

        def matrix() -> nn.Parameter:
            return nn.Parameter((torch.rand(channels, channels, generator=generator) * 2 - 1) * bound)

        self.q, self.k, self.v = matrix(), matrix(), matrix()
        if kind == "stam":
            self.out = matrix()
            self.gain = nn.Parameter(torch.zeros(()))
            for name in MAPPINGS:                      # singular vectors of each mapping (saved with the module)
                start = F.normalize(torch.randn(channels, generator=generator), dim=0)
                self.register_buffer(f"u_{name}", start)
                self.register_buffer(f"v_{name}", torch.zeros(channels))
            self.refresh_spectral_norms(CONVERGED_ITERATIONS)
        else:
            self.out = nn.Parameter(torch.zeros(channels, channels))
            self.out_bias = nn.Parameter(torch.zeros(channels))
            self.norm_weight = nn.Parameter(torch.ones(channels))
            self.norm_bias = nn.Parameter(torch.zeros(channels))

    @staticmethod
    def state_shapes(channels: int, kind: str) -> dict[str, tuple[int, ...]]:
        """Name and shape of every entry of the state dict of a ``kind`` module of ``channels`` channels."""
        shapes = {name: (channels, channels) for name in MAPPINGS}
        if kind == "stam":
            return {**shapes, "gain": (), **{f"{uv}_{name}": (channels,) for name in MAPPINGS for uv in "uv"}}
        return {**shapes, "out_bias": (channels,), "norm_weight": (channels,), "norm_bias": (channels,)}

    def refresh_spectral_norms(self, iterations: int = 1) -> None:
        """stam: advance the power iteration of every mapping (once per tuning step, outside the forward pass, so
        a checkpointed recomputation sees the same σ; to convergence when a module is made or finished)."""
        if self.kind != "stam":
            return
        for name in MAPPINGS:
            u, v = power_iteration(getattr(self, name), getattr(self, f"u_{name}"), iterations)
            getattr(self, f"u_{name}").copy_(u)
            getattr(self, f"v_{name}").copy_(v)

    def weights(self) -> TemporalWeights:
        """The effective weights (differentiable in the parameters)."""
        if self.kind == "stam":
            q, k, v, out = (spectral_normalized(getattr(self, n), getattr(self, f"u_{n}"), getattr(self, f"v_{n}"))
                            for n in MAPPINGS)
            return TemporalWeights("stam", self.heads, q, k, v, self.gain * out)
        return TemporalWeights("layernorm", self.heads, self.q, self.k, self.v, self.out, self.out_bias,
                               self.norm_weight, self.norm_bias)

    def forward(self, x: torch.Tensor, chunks: int) -> torch.Tensor:
        return temporal_attention(x, chunks, self.weights())
