"""The temporal adapter: what one-shot tuning adds to a MODEL, as patches on a clone, and its file.

Tune-A-Video (Wu et al., ICCV 2023) inflates the image UNet with a temporal attention in every transformer
block and tunes it together with the attention query projections; EI² (Zhang et al., NeurIPS 2023) makes the
temporal attention shift-restricted (STAM). Here the temporal attention of each block is a ``middle_patch`` (run
right after the block's self-attention residual, on ``(chunks·F, T, C)``) and the tuned queries are ``W + ΔW``
weight patches: the artist's UNet, its classes and its weights stay as they are. Spatial layers are per frame
("pseudo-3D") because in ComfyUI the frames are the batch.

Files: ``models/tve_adapters/*.safetensors``, tensors ``temporal.<block>.<param>`` and ``query.<weight key>``,
the configuration in the safetensors metadata.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch

from ..attention.temporal import KINDS, TemporalAttention, TemporalWeights, temporal_attention
from . import host, sockets

ATTACHMENT = "tve_temporal_adapter"
FORMAT = "tve_temporal_adapter/1"
BlockKey = tuple[str, int, int]


def block_name(key: BlockKey) -> str:
    return f"{key[0]}.{key[1]}.{key[2]}"


def model_blocks(model: Any) -> dict[str, tuple[int, int]]:
    """``{block name: (channels, heads)}`` of every transformer block of the model's UNet."""
    return {block_name(b.key): (b.channels, host.attention_heads(model, b)) for b in host.attention_blocks(model)}


@dataclass(frozen=True, eq=False)
class TemporalAdapter:
    """The TVE_TEMPORAL_ADAPTER socket value: tuned temporal attention and query deltas, fp32 on the CPU."""
    kind: str                                  # "stam" (EI²) or "layernorm" (Tune-A-Video)
    family: str                                # host.model_family() of the model it was tuned on
    blocks: dict[str, tuple[int, int]]         # block name -> (channels, heads)
    temporal: dict[str, dict[str, torch.Tensor]]  # block name -> TemporalAttention state dict
    query_diffs: dict[str, torch.Tensor]       # to_q weight key -> tuned minus base weight
    trainable: str                             # what was tuned (one_shot.TRAINABLE)
    steps: int
    losses: tuple[float, ...]                  # the diffusion loss of every tuning step

    def modules(self) -> dict[str, TemporalAttention]:
        modules = {}
        for name, (channels, heads) in self.blocks.items():
            module = TemporalAttention(channels, heads, self.kind)
            module.load_state_dict(self.temporal[name])
            modules[name] = module
        return modules

    def check_model(self, model: Any) -> None:
        family = host.model_family(model)
        if family != self.family:
            raise ValueError(f"adapter: tuned on a {self.family} model but this model is {family}; load it onto "
                             "the model it was tuned with (or tune again on this one)")
        blocks = model_blocks(model)
        if blocks != self.blocks:
            raise ValueError(f"adapter: tuned on a {self.family} UNet with {len(self.blocks)} transformer blocks "
                             f"but this model has {len(blocks)} of other widths; load it onto the model it was "
                             "tuned with")


class TemporalPatch:
    """The middle_patch: ``x + TemporalAttention_block(x)`` for the block it is called from.

    Trainable while tuning (the modules' weights are recomputed every call, so gradients reach them); frozen
    otherwise (effective weights computed once, cast per device and dtype on first use)."""

    def __init__(self, modules: Mapping[str, TemporalAttention], trainable: bool):
        self.trainable = trainable
        self.names = frozenset(modules)
        self.modules = dict(modules) if trainable else {}
        self._frozen: dict[str, TemporalWeights] = {}
        self._cast: dict[tuple[torch.device, torch.dtype], dict[str, TemporalWeights]] = {}
        if not trainable:
            with torch.no_grad():
                self._frozen = {name: _detached(m.weights()) for name, m in modules.items()}

    def __deepcopy__(self, memo: dict) -> "TemporalPatch":
        return self                                   # shared by clones of the patched MODEL

    def __call__(self, x: torch.Tensor, extra_options: Mapping[str, Any]) -> torch.Tensor:
        name = block_name(host.block_key(extra_options))
        if name not in self.names:
            raise ValueError(f"adapter: the UNet ran transformer block {name}, which the adapter has no temporal "
                             "attention for")
        chunks = len(extra_options["cond_or_uncond"])
        if self.trainable:
            return temporal_attention(x, chunks, self.modules[name].weights())
        cast = self._cast.get((x.device, x.dtype))
        if cast is None:
            cast = {n: w.to(x.device, x.dtype) for n, w in self._frozen.items()}
            self._cast[(x.device, x.dtype)] = cast
        return temporal_attention(x, chunks, cast[name])


def _detached(w: TemporalWeights) -> TemporalWeights:
    return TemporalWeights(w.kind, w.heads, *(None if t is None else t.detach().float() for t in
                                              (w.q, w.k, w.v, w.out, w.out_bias, w.norm_weight, w.norm_bias)))


def check_unadapted(model: Any) -> None:
    if host.get_attachment(model, ATTACHMENT) is not None:
        raise ValueError("model: it already carries a temporal adapter; tune or load onto the model without one")


def apply_adapter(model: Any, adapter: TemporalAdapter) -> Any:
    """A clone of ``model`` with the adapter's temporal attention and query deltas (checked first: a refused
    adapter leaves nothing patched)."""
    sockets.expect(adapter, TemporalAdapter, "adapter", sockets.TEMPORAL_ADAPTER)
    adapter.check_model(model)
    check_unadapted(model)
    m = model.clone()
    if adapter.query_diffs:
        host.add_weight_diffs(m, adapter.query_diffs)
    host.set_middle_patch(m, TemporalPatch(adapter.modules(), trainable=False))
    host.set_attachment(m, adapter, ATTACHMENT)
    return m


# ---------------------------------------------------------------------------------------------- files
def save_adapter(adapter: TemporalAdapter, path: str) -> None:
    tensors = {f"temporal.{name}.{param}": t.detach().float().cpu().contiguous()
               for name, state in adapter.temporal.items() for param, t in state.items()}
    tensors.update({f"query.{key}": d.detach().float().cpu().contiguous() for key, d in adapter.query_diffs.items()})
    metadata = {"format": FORMAT, "kind": adapter.kind, "family": adapter.family, "trainable": adapter.trainable,
                "steps": str(adapter.steps), "blocks": json.dumps(adapter.blocks),
                "losses": json.dumps(list(adapter.losses))}
    safetensors.torch.save_file(tensors, path, metadata=metadata)


def load_adapter(path: str) -> TemporalAdapter:
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"adapter_name: {path} is not a TVE temporal adapter (no '{FORMAT}' metadata)")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    kind = metadata["kind"]
    if kind not in KINDS:
        raise ValueError(f"adapter_name: {path} has temporal attention kind '{kind}', expected one of {list(KINDS)}")
    blocks = {name: (int(c), int(h)) for name, (c, h) in json.loads(metadata["blocks"]).items()}
    temporal: dict[str, dict[str, torch.Tensor]] = {name: {} for name in blocks}
    query_diffs = {}
    for key, t in tensors.items():
        if key.startswith("query."):
            query_diffs[key[len("query."):]] = t
        else:
            name, param = key[len("temporal."):].rsplit(".", 1)
            temporal[name][param] = t
    return TemporalAdapter(kind=kind, family=metadata["family"], blocks=blocks, temporal=temporal,
                           query_diffs=query_diffs, trainable=metadata["trainable"], steps=int(metadata["steps"]),
                           losses=tuple(json.loads(metadata["losses"])))


def save_to_adapter_folder(adapter: TemporalAdapter, filename_prefix: str) -> str:
    """Save Temporal Adapter (TVE): the adapter as a new file in models/tve_adapters; its path."""
    path = host.new_adapter_path(filename_prefix)
    save_adapter(adapter, path)
    return path


def load_from_adapter_folder(model: Any, adapter_name: str) -> tuple[Any, TemporalAdapter]:
    """Load Temporal Adapter (TVE): ``models/tve_adapters/<adapter_name>`` applied to a clone of ``model``."""
    adapter = load_adapter(host.adapter_path(adapter_name))
    return apply_adapter(model, adapter), adapter
