"""Timing a person can trust on a shared machine: the benches' one way to time, interleave and label runs.

A ratio of two wall times means something only when both ran under the same load: ``interleaved`` runs the methods
in rounds (A B C, then C B A, ...), so a change of load during the bench hits every method alike, and reports the
best and the median of each. ``pin_threads`` fixes torch's intra-op threads (1 by default: on a loaded 2-core box,
two threads ran 14x slower than one). ``with_attention`` selects ComfyUI's attention backend for one model clone
through the host's own per-model override (``transformer_options["optimized_attention_override"]``, on both host
releases), so one process can time the sub-quadratic backend (the CPU default) and torch SDPA (the default on
NVIDIA GPUs) side by side. ``header`` prints what a timing depends on: host release, threads, load average.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

# ComfyUI's registered attention functions (comfy.ldm.modules.attention.get_attention_function) a bench may name
BACKENDS = {"sub_quad": "sub-quadratic (ComfyUI's CPU default)", "pytorch": "torch SDPA (ComfyUI's GPU default)",
            "split": "split", "basic": "basic"}


def add_arguments(ap: argparse.ArgumentParser, repeats: int = 3, backends: Sequence[str] = ("sub_quad", "pytorch")
                  ) -> None:
    """``--threads``, ``--repeats`` and ``--backends``: the options every timing bench takes."""
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: stable on a shared "
                    "CPU; more threads on a loaded machine can be many times slower)")
    ap.add_argument("--repeats", type=int, default=repeats, help="interleaved rounds (best and median printed)")
    ap.add_argument("--backends", nargs="+", default=list(backends), choices=sorted(BACKENDS),
                    help="ComfyUI attention backends to time the host's attention with")


def pin_threads(threads: int = 1) -> int:
    """Fix torch's intra-op threads; returns the number set."""
    import torch
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def host_release() -> str:
    try:
        from comfyui_version import __version__
        return f"ComfyUI {__version__}"
    except ImportError:
        return "ComfyUI (release unknown)"


def header(what: str) -> None:
    """One line: what is timed, the host release and its default attention backend, torch, threads, load."""
    import sys

    import torch
    host = "no ComfyUI host (torch SDPA)"
    if "comfy.model_management" in sys.modules:             # the host is imported (_tve.real_host)
        host = f"{host_release()}, default attention {backend_label(default_backend())}"
    print(f"# {what}; {host}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s), "
          f"{load_average()} (absolute times are not comparable across runs; ratios come from one interleaved run)",
          flush=True)


# ---------------------------------------------------------------------------------------------- attention backends
def attention_function(name: str) -> Callable:
    """ComfyUI's attention function ``name`` (``attention_basic`` for "basic"), as registered by the host."""
    import comfy.ldm.modules.attention as attention
    if name == "basic":
        return attention.attention_basic
    return attention.get_attention_function(name)


def default_backend() -> str:
    """The name of the backend the host selected at import (from its command line flags)."""
    import comfy.ldm.modules.attention as attention
    for name in ("sub_quad", "pytorch", "split", "basic"):
        if attention.optimized_attention is attention_function(name):
            return name
    return getattr(attention.optimized_attention, "__name__", "unknown")


def with_attention(model: Any, name: str) -> Any:
    """A clone of ``model`` whose every host attention call (the UNet's and the pack's through the host adapter)
    runs ComfyUI's backend ``name``; attention the pack computes in pure torch is unaffected."""
    chosen = attention_function(name)

    def override(default: Callable, *args: Any, **kwargs: Any) -> Any:
        return chosen(*args, **kwargs)

    m = model.clone()
    m.model_options["transformer_options"]["optimized_attention_override"] = override
    return m


def backend_label(name: str) -> str:
    return BACKENDS.get(name, name)


# ---------------------------------------------------------------------------------------------- interleaving
@dataclass
class Times:
    seconds: list[float]

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def __str__(self) -> str:
        return f"best {self.best:.3g} s, median {self.median:.3g} s of {len(self.seconds)}"


def interleaved(runs: Mapping[str, Callable[[], Any]], repeats: int = 3, warmup: bool = True,
                device: Any = None) -> dict[str, Times]:
    """Wall seconds of each ``runs[name]()`` over ``repeats`` rounds, the methods alternating within every round
    (forward, then backward: A B, B A, A B, ...) after one untimed warm-up round. ``device``: an accelerator whose
    queue is waited for before each clock read (CUDA)."""
    import torch

    def wait() -> None:
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    names = list(runs)
    if warmup:
        for name in names:
            runs[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            wait()
            start = time.perf_counter()
            runs[name]()
            wait()
            seconds[name].append(time.perf_counter() - start)
    return {name: Times(s) for name, s in seconds.items()}


def ratio(times: Mapping[str, Times], num: str, den: str) -> str:
    """``best-ratio x (median-ratio x median)`` of two methods of one interleaved run."""
    a, b = times[num], times[den]
    return f"{a.best / b.best:.2f}x (median {a.median / b.median:.2f}x)"


def ratio_line(times: Mapping[str, Times], num: str, den: str, what: str) -> str:
    return f"{ratio(times, num, den)} {what}: {times[num]} vs {times[den]}"
