"""The temporal adapter: what one-shot tuning adds to a MODEL, as patches on a clone, and its file.

Tune-A-Video (Wu et al., ICCV 2023) inflates the image UNet with a temporal attention in every transformer
block and tunes it together with the attention query projections; EI² (Zhang et al., NeurIPS 2023) makes the
temporal attention shift-restricted (STAM). Here the temporal attention of each block is a ``middle_patch`` (run
right after the block's self-attention residual, on ``(chunks·F, T, C)``) and the tuned queries are ``W + ΔW``
weight patches: the artist's UNet, its classes and its weights stay as they are. Spatial layers are per frame
("pseudo-3D") because in ComfyUI the frames are the batch.

Files: ``models/tve_adapters/*.safetensors``, tensors ``temporal.<block>.<param>`` and ``query.<weight key>``,
the configuration in the safetensors metadata; since format 2 also the identity of the model it was tuned on
(``host.WeightsFingerprint``: metadata ``identity`` and tensors ``identity.base`` / ``identity.patch_values``).
Loading checks every field and tensor (``validation``), so a damaged or foreign file is one error naming
``adapter_name``, the file and what was expected.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch

from ..attention.temporal import KINDS, TemporalAttention, TemporalWeights, temporal_attention
from . import host, sockets, validation

ATTACHMENT = "tve_temporal_adapter"
FORMAT = "tve_temporal_adapter/2"
LEGACY_FORMAT = "tve_temporal_adapter/1"          # before the identity: read, loaded only when allowed
TRAINABLE = ["temporal+queries", "temporal"]    # Tune-A-Video: attn_temp, attn1.to_q, attn2.to_q; or temporal only
TENSOR_GROUPS = ("temporal.", "query.", "identity.")
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
    identity: host.WeightsFingerprint | None = None   # the weights it was tuned on (None: made before format 2)
    source: str | None = None                  # the file it was loaded from

    def modules(self) -> dict[str, TemporalAttention]:
        modules = {}
        for name, (channels, heads) in self.blocks.items():
            module = TemporalAttention(channels, heads, self.kind)
            module.load_state_dict(self.temporal[name])
            modules[name] = module
        return modules

    @property
    def input(self) -> str:
        """What errors about this adapter name: the loader's input and file, or the socket."""
        return f"adapter_name: {self.source}" if self.source else "adapter"

    def check_model(self, model: Any, allow_other_checkpoint: bool = False) -> str | None:
        """The model has this adapter's family, blocks and query projections (of the tuned shapes) and, unless
        ``allow_other_checkpoint``, the weights it was tuned on (``host.weights_fingerprint``). Returns the note to
        show where other weights were allowed (None: the same weights, or nothing recorded to compare)."""
        family = host.model_family(model)
        if family != self.family:
            raise ValueError(f"{self.input}: tuned on a {self.family} model but this model is {family}; load it "
                             "onto the model it was tuned with (or tune again on this one)")
        blocks = model_blocks(model)
        if blocks != self.blocks:
            raise ValueError(f"{self.input}: tuned on a {self.family} UNet with {len(self.blocks)} transformer "
                             f"blocks but this model has {len(blocks)} of other widths; load it onto the model it "
                             "was tuned with")
        if self.query_diffs:
            keys = [key for b in host.attention_blocks(model) for key in host.query_weight_keys(b)]
            validation.query_diffs_fit(self.query_diffs, keys, host.weight_shapes(model, self.query_diffs),
                                       self.input)
        remedy = ("load it onto the checkpoint (and LoRAs) it was tuned on, or set allow_other_checkpoint to use it "
                  "with this model anyway")
        if self.identity is None:
            if allow_other_checkpoint:
                return (f"{self.input}: records no identity of the model it was tuned on (format {LEGACY_FORMAT}); "
                        "loaded unchecked (allow_other_checkpoint is on)") if self.source else None
            if self.source:
                raise ValueError(f"{self.input}: records no identity of the model it was tuned on (saved in format "
                                 f"{LEGACY_FORMAT}); {remedy}")
            return None
        current = host.weights_fingerprint(model)
        if not allow_other_checkpoint:
            validation.same_weights(self.identity, current, self.input, "was tuned on a model", remedy)
            return None
        difference = validation.weights_difference(self.identity, current)
        return None if difference is None else (
            f"{self.input}: was tuned on other weights than this model's: {difference}; loaded anyway "
            "(allow_other_checkpoint is on): its tuned deltas were learnt for those weights")


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


def apply_adapter(model: Any, adapter: TemporalAdapter, allow_other_checkpoint: bool = False) -> Any:
    """A clone of ``model`` with the adapter's temporal attention and query deltas (checked first: a refused
    adapter leaves nothing patched)."""
    return adapted(model, adapter, allow_other_checkpoint)[0]


def adapted(model: Any, adapter: TemporalAdapter, allow_other_checkpoint: bool = False) -> tuple[Any, str | None]:
    """``apply_adapter``, and the note to show where ``allow_other_checkpoint`` let other weights through."""
    sockets.expect(adapter, TemporalAdapter, "adapter", sockets.TEMPORAL_ADAPTER)
    note = adapter.check_model(model, allow_other_checkpoint)
    check_unadapted(model)
    m = model.clone()
    if adapter.query_diffs:
        host.add_weight_diffs(m, adapter.query_diffs)
    host.set_middle_patch(m, TemporalPatch(adapter.modules(), trainable=False))
    host.set_attachment(m, adapter, ATTACHMENT)
    return m, note


# ---------------------------------------------------------------------------------------------- files
def save_adapter(adapter: TemporalAdapter, path: str) -> None:
    tensors = {f"temporal.{name}.{param}": t.detach().float().cpu().contiguous()
               for name, state in adapter.temporal.items() for param, t in state.items()}
    tensors.update({f"query.{key}": d.detach().float().cpu().contiguous() for key, d in adapter.query_diffs.items()})
    metadata = {"format": FORMAT if adapter.identity is not None else LEGACY_FORMAT, "kind": adapter.kind,
                "family": adapter.family, "trainable": adapter.trainable, "steps": str(adapter.steps),
                "blocks": json.dumps(adapter.blocks), "losses": json.dumps(list(adapter.losses))}
    if adapter.identity is not None:
        identity = adapter.identity
        metadata["identity"] = json.dumps({"layout": identity.layout, "patches": identity.patches,
                                           "summary": identity.summary})
        tensors["identity.base"] = identity.base.float().contiguous()
        tensors["identity.patch_values"] = identity.patch_values.float().contiguous()
    safetensors.torch.save_file(tensors, path, metadata=metadata)


def load_adapter(path: str) -> TemporalAdapter:
    """The adapter in ``path``; a damaged, foreign or inconsistent file is one ValueError naming ``adapter_name``,
    the file, what is wrong and what was expected (``validation``)."""
    prefix = f"adapter_name: {path}"
    metadata, tensors = validation.read_safetensors(
        path, "adapter_name", "a TVE temporal adapter (.safetensors)",
        "save it again with Save Temporal Adapter (TVE), or tune again")
    form = metadata.get("format")
    if form not in (FORMAT, LEGACY_FORMAT):
        if form is not None and form.startswith("tve_temporal_adapter/"):
            raise ValueError(f"{prefix} is in format '{form}', which this TVE does not read; expected {FORMAT} or "
                             f"{LEGACY_FORMAT} (update TVE)")
        raise ValueError(f"{prefix} is not a TVE temporal adapter (no '{FORMAT}' metadata: a LoRA, checkpoint or "
                         "other safetensors file?); save one with Save Temporal Adapter (TVE)")
    kind = validation.metadata_choice(metadata, "kind", prefix, KINDS)
    family = validation.metadata_field(metadata, "family", prefix, "the model family it was tuned on, e.g. 'SD15/EPS'")
    if not re.fullmatch(r"\w+/\w+", family):
        raise validation.bad_metadata(prefix, "family", family, "a model family such as 'SD15/EPS'")
    trainable = validation.metadata_choice(metadata, "trainable", prefix, TRAINABLE)
    steps = validation.metadata_count(metadata, "steps", prefix)
    losses = validation.metadata_numbers(metadata, "losses", prefix)
    blocks = validation.metadata_blocks(metadata, "blocks", prefix)
    groups = TENSOR_GROUPS if form == FORMAT else TENSOR_GROUPS[:2]
    validation.adapter_tensor_names(tensors, prefix, groups)
    temporal = validation.temporal_tensors(tensors, blocks, kind,
                                           lambda c: TemporalAttention.state_shapes(c, kind), prefix)
    query_diffs = validation.query_tensors(tensors, blocks, trainable, prefix)
    identity = _load_identity(metadata, tensors, prefix) if form == FORMAT else None
    return TemporalAdapter(kind=kind, family=family, blocks=blocks, temporal=temporal, query_diffs=query_diffs,
                           trainable=trainable, steps=steps, losses=losses, identity=identity, source=path)


def _load_identity(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor], prefix: str
                   ) -> host.WeightsFingerprint:
    expected = 'a JSON object {"layout": sha256, "patches": sha256, "summary": text}'
    raw = validation.metadata_json(metadata, "identity", prefix, expected)
    if (not isinstance(raw, dict) or set(raw) != {"layout", "patches", "summary"}
            or not all(isinstance(raw[k], str) and re.fullmatch("[0-9a-f]{64}", raw[k]) for k in ("layout", "patches"))
            or not isinstance(raw["summary"], str)):
        raise validation.bad_metadata(prefix, "identity", metadata["identity"], expected)
    values = {}
    for part in ("base", "patch_values"):
        key = f"identity.{part}"
        if key not in tensors:
            raise ValueError(f"{prefix}: lacks the tensor '{key}'; a {FORMAT} adapter records the weights it was "
                             "tuned on there")
        t = tensors[key]
        values[part] = validation.adapter_tensor(t, key, (t.numel(),), prefix, "a 1-D list of weight samples")
    extra = sorted(k for k in tensors if k.startswith("identity.") and k[len("identity."):] not in values)
    if extra:
        raise ValueError(f"{prefix}: holds a tensor '{extra[0]}' that is not part of a temporal adapter; expected "
                         "identity.base and identity.patch_values")
    return host.WeightsFingerprint(layout=raw["layout"], base=values["base"], patches=raw["patches"],
                                   patch_values=values["patch_values"], summary=raw["summary"])


def save_to_adapter_folder(adapter: TemporalAdapter, filename_prefix: str) -> str:
    """Save Temporal Adapter (TVE): the adapter as a new file in models/tve_adapters; its path."""
    path = host.new_adapter_path(filename_prefix)
    save_adapter(adapter, path)
    return path


def load_from_adapter_folder(model: Any, adapter_name: str, allow_other_checkpoint: bool = False
                             ) -> tuple[Any, TemporalAdapter, str | None]:
    """Load Temporal Adapter (TVE): ``models/tve_adapters/<adapter_name>`` applied to a clone of ``model`` (refused
    onto other weights than it was tuned on unless ``allow_other_checkpoint``; then the note to show)."""
    adapter = load_adapter(host.adapter_path(adapter_name))
    model, note = adapted(model, adapter, allow_other_checkpoint)
    return model, adapter, note
