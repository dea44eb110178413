"""Timing helpers shared by the edit benchmarks (real host): a tiny SD1.5-shaped model, an inverted random
video, and the wall time of one edit against plain CFG sampling of the same frames and steps."""
import time

import torch


def inverted_video(frames: int, size: int, steps: int, family: str = "sd15", model=None):
    """(model, x_T, inversion) for random latents of ``frames`` × 4 × size × size."""
    from tve.engine.inversion import invert
    from tve.tests.hosts import make_conditioning, make_tiny_model
    model = model if model is not None else make_tiny_model(family)
    latent = torch.randn(frames, 4, size, size, generator=torch.Generator().manual_seed(0))
    x_T, inversion = invert(model, latent, make_conditioning(family, 1), steps, "ddim_uniform")
    return model, x_T, inversion


def cfg_edit(model, x_T, sigmas, family: str = "sd15", cfg: float = 7.5) -> float:
    """Seconds for one CFG edit of ``x_T`` on ``sigmas`` (no new noise), as the shipped workflows sample."""
    import comfy.sample
    import comfy.samplers
    from tve.tests.hosts import make_conditioning
    start = time.perf_counter()
    comfy.sample.sample_custom(model, torch.zeros_like(x_T), cfg, comfy.samplers.sampler_object("euler"), sigmas,
                               make_conditioning(family, 2), make_conditioning(family, 3), x_T, disable_pbar=True)
    return time.perf_counter() - start


def peak_rss_rise(fn, interval_s: float = 0.002) -> int:
    """Bytes of resident memory the call ``fn()`` adds at its peak, sampled from /proc by a thread (CPU runs:
    torch's allocator returns large blocks to the OS, so the resident set tracks the tensors alive)."""
    import os
    import threading

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before, peak, done = rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(interval_s)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], rss()) - before
