"""Count the device->host synchronisations the pack's code makes while a model samples (real host, any device).

On an accelerator, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``,
``.cpu()``, ``torch.equal``, ``nonzero``/``unique`` and boolean-mask indexing, whose output size depends on the
values) waits for every queued kernel; a blocking host->device copy (``cpu_tensor.to(device)``,
``torch.tensor(list, device=device)``) waits too. Inside the UNet (per attention or UNet block) such a wait stalls
the pipeline dozens of times per step; once per step it costs nothing.

``SyncAudit`` finds them on any machine, the CPU included, without a GPU: a ``TorchFunctionMode`` sees every torch
call made while it is active and tracks which tensors would live on the accelerator: those the UNet is called with
(x, timesteps, context, the ``sigmas`` / ``sample_sigmas`` of ``transformer_options``, marked by a
``DIFFUSION_MODEL`` wrapper on the audited clone), everything computed from them, and what is created or copied
onto a ``torch.device``. A value read from such a tensor is a device->host sync; a CPU tensor sent to a
``torch.device`` is a host->device copy. Each event is attributed to the innermost frame of the pack's own code
(file:line) and to its scope: ``block`` when it happens inside a UNet call (per attention / UNet block), ``call``
when outside (per sampler call: once per step).

    audit = SyncAudit()
    with audit:
        sample(audit.audited(model), ...)
    audit.events(scope="block")        # Counter of (kind, "nodes/host.py:310", via) -> count

Host-side ``.to("cpu")``/``.cpu()`` is read as a device->host copy, ``.to(<torch.device>)`` as a copy to the
accelerator (the pack writes ``"cpu"`` when it means the host and ``x.device`` when it means the accelerator).
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
PACK_DIRS = tuple(str(ROOT / d) + "/" for d in ("engine", "nodes", "attention", "flow"))
# the host adapter's sampler entry (``host.sample``), which tests and scripts call to sample: a sync below it and
# no deeper pack frame is comfy's sampler's own, and a pack caller further out is where it is the pack's
PASS_THROUGH = {(str(ROOT / "engine" / "host.py"), "sample")}
MARK = "_tve_on_device"
WRAPPER_KEY = "tve_sync_audit"

# a value read on the host: always a sync when the tensor lives on the accelerator
READS = {"item", "__bool__", "__float__", "__int__", "__index__", "__complex__", "tolist", "numpy", "cpu",
         "equal", "allclose", "is_nonzero", "__format__", "__repr__", "__str__"}
# outputs whose size depends on the values: the host waits to learn the size
DATA_DEPENDENT = {"nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "nonzero_static"}
COPIES_FROM_HOST = {"tensor", "as_tensor", "from_numpy"}


def _name(func: Any) -> str:
    return getattr(func, "__name__", str(func))


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def on_device(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, MARK, False)


def _mark(obj: Any) -> None:
    for t in _tensors(obj):
        try:
            setattr(t, MARK, True)
        except (AttributeError, RuntimeError):
            pass


class SyncAudit(TorchFunctionMode):
    """Records (kind, pack site, via, scope) of every sync while active; see the module docstring. ``sites``:
    the folders whose code is audited (the pack's engine/, nodes/, attention/ and flow/)."""

    def __init__(self, sites: tuple[str, ...] = PACK_DIRS) -> None:
        super().__init__()
        self.sites = sites
        self.counts: collections.Counter = collections.Counter()
        self.unet_depth = 0
        self.accelerators: dict[int, torch.device] = {}   # ``.device`` objects read from accelerator tensors (kept
        #                                                      alive, so their ids stay theirs)

    # ------------------------------------------------------------------------------------------ what is audited
    def audited(self, model: Any) -> Any:
        """A clone of ``model`` (a ModelPatcher) whose UNet inputs are marked as accelerator tensors."""
        from tve.engine import host

        m = model.clone()
        host.add_wrapper(m, host.DIFFUSION_MODEL, WRAPPER_KEY, self._diffusion_model)
        return m

    def __deepcopy__(self, memo: dict) -> "SyncAudit":
        return self                                   # ModelPatcher.clone deep-copies model_options

    def _diffusion_model(self, executor: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        options = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})
        _mark([x, args[:4], options.get("sigmas"), kwargs])          # the sampler's σ: one tensor per call
        if isinstance(options.get("sample_sigmas"), torch.Tensor):
            # the schedule the sampler moved to the accelerator; on the CPU it is the caller's own tensor (an
            # inversion's grid), which stays on the host: mark a view, for this call's options only
            options["sample_sigmas"] = options["sample_sigmas"].view_as(options["sample_sigmas"])
            _mark(options["sample_sigmas"])
        self.unet_depth += 1
        try:
            return executor(x, *args, **kwargs)
        finally:
            self.unet_depth -= 1

    # ------------------------------------------------------------------------------------------ results
    def events(self, scope: str | None = None) -> collections.Counter:
        """Counter of (kind, site, via) -> calls; ``scope`` "block" (inside UNet calls) or "call" (outside)."""
        out: collections.Counter = collections.Counter()
        for (kind, site, via, where), n in self.counts.items():
            if scope is None or where == scope:
                out[kind, site, via] += n
        return out

    def report(self, scope: str | None = None) -> str:
        rows = sorted(self.events(scope).items(), key=lambda kv: (-kv[1], kv[0]))
        return "\n".join(f"{n:6d}  {kind:<24} {site}{f'  (via {via})' if via else ''}" for (kind, site, via), n
                         in rows) or "(none)"

    # ------------------------------------------------------------------------------------------ the mode
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self._kind(func, args, kwargs)
        if kind is not None:
            self._record(kind)
        out = func(*args, **kwargs)
        if kind in ("device->host read", "device->host copy"):
            return out
        if isinstance(out, torch.device):                 # ``t.device``: the accelerator when t lives there
            if args and on_device(args[0]):
                self.accelerators[id(out)] = out
            return out
        inputs = list(_tensors((args, kwargs)))
        if kind == "host->device copy" or self._accelerator(kwargs.get("device")) or any(map(on_device, inputs)):
            if isinstance(out, torch.Tensor) and any(out is t for t in inputs if not on_device(t)):
                out = out.view_as(out)            # on the CPU, .to(device) returns the host tensor itself
            _mark(out)
        return out

    def _kind(self, func: Any, args: tuple, kwargs: dict) -> str | None:
        name = _name(func)
        inputs = list(_tensors((args, kwargs)))
        device_in = any(on_device(t) for t in inputs)
        if device_in and name in READS:
            return "device->host copy" if name == "cpu" else "device->host read"
        if device_in and name in DATA_DEPENDENT:
            return f"data-dependent size ({name})"
        if device_in and name in ("__getitem__", "__setitem__", "index_put_", "index_put") and any(
                t.dtype == torch.bool for t in _tensors(args[1:2])):
            return "data-dependent size (bool mask)"
        if device_in and name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor) \
                and kwargs.get("output_size") is None:
            return "data-dependent size (repeat_interleave)"
        if name == "to" and inputs:
            target = self._to_target(args[1:], kwargs)
            if on_device(args[0]) and target == "host":
                return "device->host copy"
            if not on_device(args[0]) and target == "device":
                return "host->device copy"
        if name in COPIES_FROM_HOST and self._accelerator(kwargs.get("device")):
            return "host->device copy"
        return None

    def _accelerator(self, device: Any) -> bool:
        """``device`` is the accelerator: the ``.device`` of an accelerator tensor, or named so ("cuda", ...)."""
        if isinstance(device, str):
            return not device.startswith("cpu")
        return self.accelerators.get(id(device)) is device is not None or (
            isinstance(device, torch.device) and device.type != "cpu")

    def _to_target(self, args: tuple, kwargs: dict) -> str | None:
        """'host' for ``.to("cpu")`` or ``.to(<cpu device>)``, 'device' for ``.to(<accelerator>)`` or
        ``.to(<accelerator tensor>)``; None for a dtype-only ``.to``."""
        for a in (*args, kwargs.get("device"), kwargs.get("other")):
            if isinstance(a, (str, torch.device)):
                return "device" if self._accelerator(a) else "host"
            if isinstance(a, torch.Tensor):
                return "device" if on_device(a) else "host"
        return None

    def _record(self, kind: str) -> None:
        frame = sys._getframe(2)
        via = ""
        while frame is not None:
            path = frame.f_code.co_filename
            if path == __file__ or (path, frame.f_code.co_name) in PASS_THROUGH:
                frame = frame.f_back
                continue
            if path.startswith(self.sites):
                site = f"{Path(path).relative_to(ROOT)}:{frame.f_lineno}"
                self.counts[kind, site, via, "block" if self.unet_depth else "call"] += 1
                return
            if not via and "/torch/" not in path:
                via = f"{Path(path).name}:{frame.f_code.co_name}"
            frame = frame.f_back
