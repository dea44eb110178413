"""One-Shot Tune (TVE): one-shot tuning on the source clip (Tune-A-Video, Wu et al., ICCV 2023) with EI²'s
shift-restricted temporal attention (STAM; Zhang et al., NeurIPS 2023).

Every transformer block of a clone of the artist's MODEL gets a temporal attention (``stam`` or Tune-A-Video's
``layernorm``, zero-initialised: the untuned clone is the original model); it is tuned, with the attention query
projections (Tune-A-Video's trainable set), on the clip's diffusion loss: per step one timestep t ~ U{0..T-1} for
the whole clip, ε ~ N(0, I) per frame, ``x_t = x_0 + σ_t ε``, loss ``‖ε̂(x_t, σ_t) − ε‖²`` with
``ε̂ = (x_t − D(x_t; σ_t)) / σ_t`` (DDPM's simple loss in σ-space). Whatever attention patches are on the MODEL are
tuned through (connect Apply Cross-Frame Attention 'fine_coarse' first for EI²'s FFAM). The output is a
fresh clone with the tuned adapter as patches; the base weights are never changed.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..attention.temporal import CONVERGED_ITERATIONS, KINDS, TemporalAttention
from . import host, validation
from .loss_graph import loss_graph
from .temporal_adapter import (TRAINABLE, TemporalAdapter, TemporalPatch, apply_adapter, block_name,
                               check_unadapted)

CATEGORY = "video editing/TVE"
WEIGHT_DECAY = 1e-2                              # Tune-A-Video's AdamW


def check_inputs(model: Any, samples: torch.Tensor, conditioning: list, steps: int, learning_rate: float,
                 kind: str, trainable: str) -> None:
    """One clear error per bad input, before anything is patched."""
    validation.integer(steps, "steps", 1)
    validation.number(learning_rate, "learning_rate", 0.0)
    validation.choice(kind, "kind", KINDS)
    validation.choice(trainable, "trainable", TRAINABLE)
    validation.model(model)
    validation.latent({"samples": samples}, "latent")
    if samples.shape[0] < 2:
        raise ValueError(f"latent: one-shot tuning learns the motion between frames, but the clip has "
                         f"{samples.shape[0]} frame; encode at least 2 frames")
    family, width = host.model_family(model), host.context_dim(model)
    if not isinstance(conditioning, list) or not conditioning:
        raise ValueError("conditioning: expected a CONDITIONING (the source prompt encoded with this model's CLIP)")
    for embedding, extra in conditioning:
        if embedding.shape[-1] != width:
            raise ValueError(f"conditioning: its text embedding is {embedding.shape[-1]} wide but this {family} "
                             f"model's cross-attention takes {width}; encode the prompt with the CLIP of the "
                             "checkpoint the latent and the model come from")
        if host.needs_pooled_output(model) and extra.get("pooled_output") is None:
            raise ValueError(f"conditioning: this {family} model needs a pooled text embedding, which this "
                             "conditioning lacks; encode the prompt with this checkpoint's CLIP")
    check_unadapted(model)


def diffusion_loss(model: Any, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``‖ε̂(x_t, σ_t) − ε‖²`` (mean) for the clip ``x0`` (model space, F frames) at one timestep ``t`` (1,)."""
    sigma = host.training_sigmas(model, t).to(x0.device, torch.float32)
    x_t = host.noise_scaling(model, sigma, noise.to(x0), x0)
    with host.autocast(x0.device):
        denoised = denoise(x_t, sigma)
    return ((x0.float() - denoised.float()) / sigma).pow(2).mean()


def evaluate_loss(model: Any, samples: torch.Tensor, conditioning: list, draws: int, seed: int) -> float:
    """The clip's diffusion loss averaged over ``draws`` fixed (t, ε) draws of ``seed``: what tuning lowers."""
    generator = torch.Generator().manual_seed(seed)
    timesteps = host.num_timesteps(model)
    draw = [(torch.randint(0, timesteps, (1,), generator=generator), torch.randn(samples.shape, generator=generator))
            for _ in range(draws)]
    total = []

    def loop(denoise: Callable, x0: torch.Tensor) -> None:
        with torch.no_grad():
            total.extend(float(diffusion_loss(model, denoise, x0, t, noise)) for t, noise in draw)

    host.train_on_clip(model, conditioning, samples, loop)
    return sum(total) / len(total)


def tune(model: Any, samples: torch.Tensor, conditioning: list, steps: int, learning_rate: float, seed: int,
         kind: str = "stam", trainable: str = "temporal+queries", gradient_checkpointing: bool = True,
         on_step: Callable[[int, float], None] | None = None) -> TemporalAdapter:
    """Tune a temporal adapter on the clip ``samples`` (raw-space latents (F, C, h, w)); ``on_step(step, loss)``
    after each step. Deterministic for a seed on a given device."""
    check_inputs(model, samples, conditioning, steps, learning_rate, kind, trainable)
    identity = host.weights_fingerprint(model)          # the weights it is tuned on, before any tuning patch
    blocks = host.attention_blocks(model)
    device = host.torch_device()
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    update = host.progress_with_text(steps)
    with torch.inference_mode(False):
        modules = {block_name(b.key): TemporalAttention(b.channels, host.attention_heads(model, b), kind,
                                                        generator).to(device) for b in blocks}
        diffs = {}
        if trainable == "temporal+queries":
            for b in blocks:
                for key in host.query_weight_keys(b):
                    weight = model.get_model_object(key.rsplit(".", 1)[0]).weight
                    diffs[key] = torch.nn.Parameter(torch.zeros(weight.shape, device=device))
        m = model.clone()
        for key, diff in diffs.items():
            host.add_trainable_weight_diff(m, key, diff)
        host.set_middle_patch(m, TemporalPatch(modules, trainable=True))
        parameters = [p for module in modules.values() for p in module.parameters()] + list(diffs.values())
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=WEIGHT_DECAY)
        timesteps = host.num_timesteps(model)

        def loop(denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor) -> None:
            for step in range(steps):
                for module in modules.values():
                    module.refresh_spectral_norms(1)
                t = torch.randint(0, timesteps, (1,), generator=generator)
                noise = torch.randn(x0.shape, generator=generator)
                loss = diffusion_loss(model, denoise, x0, t, noise)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                update(step + 1, steps, f"step {step + 1}/{steps}  loss {losses[-1]:.4f}")
                if on_step is not None:
                    on_step(step, losses[-1])

        with host.gradient_checkpointing(m, gradient_checkpointing):
            host.train_on_clip(m, conditioning, samples, loop)
        for module in modules.values():
            module.refresh_spectral_norms(CONVERGED_ITERATIONS)
        temporal = {name: {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
                    for name, module in modules.items()}
        query_diffs = {key: d.detach().float().cpu().clone() for key, d in diffs.items()}
    return TemporalAdapter(kind=kind, family=host.model_family(model),
                           blocks={block_name(b.key): (b.channels, host.attention_heads(model, b)) for b in blocks},
                           temporal=temporal, query_diffs=query_diffs, trainable=trainable, steps=steps,
                           losses=tuple(losses), identity=identity)


def one_shot_tune(model: Any, latent: dict, conditioning: list, steps: int, learning_rate: float, seed: int,
                  kind: str, trainable: str, gradient_checkpointing: bool) -> tuple[Any, TemporalAdapter, torch.Tensor]:
    """One-Shot Tune (TVE): the tuned model (a patched clone), its adapter and the loss graph (1, H, W, 3)."""
    adapter = tune(model, validation.latent(latent, "latent"), conditioning, steps, learning_rate, seed, kind,
                   trainable, gradient_checkpointing)
    graph = loss_graph(adapter.losses, f"{kind} tuning loss, {steps} steps")
    return apply_adapter(model, adapter), adapter, graph
