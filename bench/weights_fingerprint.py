"""What ``host.weights_fingerprint`` costs on an SD1.5-sized UNet (real host, CPU): the measuring function the
model-identity checks call (issue 24), and the comparison.

    COMFYUI_PATH=/path/to/ComfyUI python bench/weights_fingerprint.py [--repeats 20]

The UNet is built by comfy from SD1.5's architecture (CompVis v1-inference: 320 channels, multipliers 1-2-4-4, two
ResBlocks per level, attention at the three finest levels, 8 heads, 768-wide context) with random fp16 weights.
Printed: the median time of a fingerprint of the base model, of the base with a rank-32 LoRA on every attention
and feed-forward projection (core's LoRA loader), of the same UNet in fp32 (twice the bytes, the same tensor
count), and of the comparison; the tiny test UNet for the scaling in the number of tensors.
"""
import argparse
import statistics
import time

import _tve

_tve.real_host()

import torch  # noqa: E402

from tve.engine import host, validation
from tve.tests.hosts import make_tiny_model  # noqa: E402

SD15_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8, num_head_channels=-1,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
                 use_temporal_resblock=False)


def sd15(dtype: torch.dtype):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SD15(dict(SD15_UNET))
    config.set_inference_dtype(dtype, None)
    model = comfy.model_base.BaseModel(config, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(p.dtype))
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def with_lora(model, rank: int = 32):
    import comfy.lora
    import comfy.sd
    g = torch.Generator().manual_seed(1)
    state, done = {}, set()
    for lora_key, key in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        if not lora_key.startswith("lora_unet_") or key in done or not key.endswith(".weight"):
            continue
        if not any(p in key for p in ("attn1.to_", "attn2.to_", ".ff.net.", "proj_in", "proj_out")):
            continue
        weight = model.get_model_object(key.rsplit(".", 1)[0]).weight
        if weight.ndim != 2:
            continue
        done.add(key)
        state[f"{lora_key}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=g).half()
        state[f"{lora_key}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=g).half()
        state[f"{lora_key}.alpha"] = torch.tensor(float(rank))
    patched, _ = comfy.sd.load_lora_for_models(model, None, state, 0.8, 0.0)
    return patched


def median_ms(fn, repeats: int) -> float:
    fn()                                                           # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)

    base = sd15(torch.float16)
    unet = base.model.diffusion_model
    tensors = len(unet.state_dict())
    params = sum(p.numel() for p in unet.parameters())
    lora = with_lora(base)
    fp_base, fp_lora = host.weights_fingerprint(base), host.weights_fingerprint(lora)
    print(f"SD1.5 UNet: {params / 1e6:.0f} M parameters in {tensors} tensors, fp16; LoRA (rank 32) on "
          f"{len(lora.patches)} weights; {host.FINGERPRINT_PER_TENSOR} samples a tensor: fingerprint "
          f"{fp_base.base.numel()} + {fp_lora.patch_values.numel()} floats")
    ms_base = median_ms(lambda: host.weights_fingerprint(base), args.repeats)
    ms_lora = median_ms(lambda: host.weights_fingerprint(lora), args.repeats)
    ms_compare = median_ms(lambda: validation.weights_difference(fp_base, fp_lora), args.repeats)
    print(f"{ms_base:8.2f} ms  fingerprint, base fp16 ({1e3 * ms_base / tensors:.1f} µs a tensor)")
    print(f"{ms_lora:8.2f} ms  fingerprint, base + LoRA ({ms_lora - ms_base:+.2f} ms for {len(lora.patches)} patched "
          "weights)")
    print(f"{ms_compare:8.3f} ms  comparison (weights_difference)")
    base.model.to(torch.float32)
    ms_fp32 = median_ms(lambda: host.weights_fingerprint(base), args.repeats)
    print(f"{ms_fp32:8.2f} ms  fingerprint, the same UNet in fp32 (2x the bytes): x{ms_fp32 / ms_base:.2f}")
    assert validation.weights_difference(fp_base, host.weights_fingerprint(base)) is None
    tiny = make_tiny_model("sd15")
    tiny_tensors = len(tiny.model.diffusion_model.state_dict())
    ms_tiny = median_ms(lambda: host.weights_fingerprint(tiny), args.repeats)
    print(f"{ms_tiny:8.2f} ms  fingerprint, tiny test UNet ({tiny_tensors} tensors, "
          f"{sum(p.numel() for p in tiny.model.parameters()) / 1e6:.2f} M parameters): "
          f"{1e3 * ms_tiny / tiny_tensors:.1f} µs a tensor")


if __name__ == "__main__":
    main()
