"""One-Shot Tune, Save Temporal Adapter and Load Temporal Adapter (TVE): node classes over ``engine/one_shot.py``
and ``engine/temporal_adapter.py`` (EI², Tune-A-Video)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..attention.temporal import KINDS
from ..engine import host, identity, sockets
from ..engine.one_shot import TRAINABLE, one_shot_tune
from ..engine.temporal_adapter import TemporalAdapter, load_from_adapter_folder, save_to_adapter_folder
from .schema import TemporalAdapter as AdapterSocket, fixed_seed, schema


class OneShotTune(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.ONE_SHOT_TUNE, (
            "One-shot tuning on the source clip (Tune-A-Video + EI²): adds a temporal attention to every transformer "
            "block ('stam': EI²'s shift-restricted module; 'layernorm': Tune-A-Video's) and tunes it, with the query "
            "projections, on the clip's diffusion loss. Returns the tuned model (a patched clone: invert and edit "
            "with it), the adapter (to save) and the loss curve. Connect Apply Cross-Frame Attention 'fine_coarse' "
            "before it for EI²'s FFAM."), [
            io.Model.Input("model", tooltip="The model to tune (with its cross-frame attention, e.g. fine_coarse)."),
            io.Latent.Input("latent", tooltip="The VAE-encoded source clip (at least 2 frames)."),
            io.Conditioning.Input("conditioning", tooltip="The prompt describing the source clip."),
            io.Int.Input("steps", default=300, min=1, max=100000,
                         tooltip="Tuning steps, one noisy copy of the whole clip each (Tune-A-Video: 500)."),
            io.Float.Input("learning_rate", default=3e-5, min=1e-7, max=1.0, step=1e-6,
                           tooltip="AdamW learning rate (Tune-A-Video: 3e-5)."),
            # A real RNG seed (module init, timesteps, noise), but tuning takes minutes and ComfyUI caches its
            # result while the inputs stay the same: a seed re-randomised on every queue would re-tune each time.
            fixed_seed("Seed of the module initialisation and the noise and timestep draws."),
            io.Combo.Input("kind", options=list(KINDS), default="stam", tooltip=(
                "'stam': EI²'s Instance Centering + normalised mappings; 'layernorm': Tune-A-Video's temporal "
                "attention (the baseline).")),
            io.Combo.Input("trainable", options=TRAINABLE, default="temporal+queries", tooltip=(
                "'temporal+queries': temporal attention and the self/cross-attention query projections "
                "(Tune-A-Video); 'temporal': only the temporal attention.")),
            io.Boolean.Input("gradient_checkpointing", default=True, tooltip=(
                "Recompute activations in the backward pass: much less memory, about a third slower.")),
        ], [io.Model.Output(display_name="model"), AdapterSocket.Output(display_name="adapter"),
            io.Image.Output(display_name="loss_graph")])

    @classmethod
    def execute(cls, model, latent: dict, conditioning: list, steps: int, learning_rate: float, seed: int, kind: str,
                trainable: str, gradient_checkpointing: bool) -> io.NodeOutput:
        return io.NodeOutput(*one_shot_tune(model, latent, conditioning, steps, learning_rate, seed, kind, trainable,
                                            gradient_checkpointing))


class SaveTemporalAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.SAVE_TEMPORAL_ADAPTER, (
            "Saves a temporal adapter from One-Shot Tune (TVE) to models/tve_adapters as .safetensors (configuration "
            "in its metadata), for Load Temporal Adapter (TVE)."), [
            AdapterSocket.Input("adapter", tooltip="The adapter from One-Shot Tune (TVE)."),
            io.String.Input("filename_prefix", default="tve_one_shot", tooltip=(
                "File name (may include sub-folders) inside models/tve_adapters; a counter is appended.")),
        ], [], output_node=True)

    @classmethod
    def execute(cls, adapter, filename_prefix: str) -> io.NodeOutput:
        sockets.expect(adapter, TemporalAdapter, "adapter", sockets.TEMPORAL_ADAPTER)
        return io.NodeOutput(ui={"text": [save_to_adapter_folder(adapter, filename_prefix)]})


class LoadTemporalAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema(identity.LOAD_TEMPORAL_ADAPTER, (
            "Loads a temporal adapter from models/tve_adapters and applies it to the model (a patched clone): "
            "temporal attention after every self-attention and the tuned query projections. Refuses an adapter "
            "tuned on another model family, and one tuned on other weights (another checkpoint of the family, other "
            "LoRAs) unless allow_other_checkpoint is on."), [
            io.Model.Input("model", tooltip="The model the adapter was tuned on."),
            io.Combo.Input("adapter_name", options=host.adapter_files(),
                           tooltip="A .safetensors file in models/tve_adapters."),
            io.Boolean.Input("allow_other_checkpoint", default=False, optional=True, tooltip=(
                "Off: refuse a model whose weights differ from those the adapter was tuned on (another checkpoint "
                "of the family, other LoRAs). On: load it anyway; the tuned deltas were learnt for the other "
                "weights.")),
        ], [io.Model.Output(display_name="model"), AdapterSocket.Output(display_name="adapter")])

    @classmethod
    def execute(cls, model, adapter_name: str, allow_other_checkpoint: bool = False) -> io.NodeOutput:
        model, adapter, note = load_from_adapter_folder(model, adapter_name, allow_other_checkpoint)
        if note is not None:
            logging.warning("[TVE] %s", note)                 # allowed other weights: said on the node and logged
        return io.NodeOutput(model, adapter, ui={"text": [note]} if note is not None else None)


NODES = {identity.ONE_SHOT_TUNE: OneShotTune, identity.SAVE_TEMPORAL_ADAPTER: SaveTemporalAdapter,
         identity.LOAD_TEMPORAL_ADAPTER: LoadTemporalAdapter}
