"""Whole-workflow memory: the shipped workflows on a headless ComfyUI server, peak resident memory per frame, and
which node holds what (real host; the e2e helpers of ``tests/e2e``).

    COMFYUI_PATH=/path/to/ComfyUI python bench/workflow_memory.py [--workflows tokenflow_edit flatten_edit]
        [--frames 12 48 120] [--clip 854x480] [--resize 128] [--steps 2] [--cache default none] [--vae tiled]
        [--source-features stored]

For each workflow, frame count and cache mode, a fresh server (``tests/e2e/headless_comfyui.py``, CPU) with the e2e
tiny SD1.5 checkpoint runs the shipped graph (``tests/e2e/ui_workflow.to_api``) on a procedural clip of exactly that
many frames at ``--clip`` size (H.264; the e2e clip world rendered small and upscaled, so writing it takes seconds),
with the e2e overrides: DIS flow, ``--steps`` DDIM steps, frames resized to ``--resize`` px on the long side, every
frame taken (the cap raised to the clip). While it runs, the server's resident set (psutil, every 10 ms) and the
node it is executing (the websocket's ``executing`` messages) are recorded. Printed: the peak resident set above
the idle server and its growth per frame between frame counts; per node, the resident set when it ends (what stays
held) and its peak while it runs, above the idle server, with the growth per frame of each; the nodes are marked
[pack] (TVE_*) or [core]. ``--cache none`` runs the server with ``--cache-none``: what core's output cache keeps.
``--vae tiled`` swaps in core's VAE Encode / Decode (Tiled), which code one frame at a time.
``--source-features stored`` sets Apply FLATTEN's ``source_features`` (the inversion keeps the injected features).
"""
import argparse
import asyncio
import json
import os
import tempfile
import threading
import time
import uuid
from fractions import Fraction
from pathlib import Path

import _timing
import _tve

ROOT = Path(__file__).resolve().parents[1]
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------- the session
def write_clip(path: Path, frames: int, height: int, width: int, fps: int = 24) -> Path:
    """``frames`` frames of the e2e clip world (seed 3) rendered at 1/4 size and upscaled to ``height x width``,
    as H.264."""
    import av
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tve.tools.video_world import render_clip
    small = render_clip(frames, max(8, height // 4), max(8, width // 4), seed=3).frames      # (F, h, w, 3)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for frame in small:
            big = F.interpolate(frame.permute(2, 0, 1)[None], size=(height, width), mode="bilinear",
                                align_corners=False)[0].permute(1, 2, 0)
            pixels = (big.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def session(root: Path) -> dict:
    """Checkpoint, custom_nodes link and extra_model_paths.yaml as the e2e session makes them (kept if there)."""
    from tve.tests.e2e.session_files import CHECKPOINT, PACK_FOLDER, RAFT_PLACEHOLDER
    from tve.tests.e2e.tiny_sd15 import write_tiny_sd15
    checkpoints, custom_nodes, flow = root / "models" / "checkpoints", root / "custom_nodes", root / "models" / "optical_flow"
    for folder in (checkpoints, custom_nodes, flow, root / "base" / "input", root / "base" / "custom_nodes"):
        folder.mkdir(parents=True, exist_ok=True)
    if not (checkpoints / CHECKPOINT).exists():
        write_tiny_sd15(checkpoints / CHECKPOINT, seed=0)
    if not (custom_nodes / PACK_FOLDER).exists():
        (custom_nodes / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
    (flow / RAFT_PLACEHOLDER).write_bytes(b"")
    config = root / "extra_model_paths.yaml"
    paths = {"custom_nodes": custom_nodes, "checkpoints": checkpoints, "optical_flow": flow}
    config.write_text("tve_bench:\n" + "".join(f"    {k}: {json.dumps(str(v))}\n" for k, v in paths.items()))
    return {"base": root / "base", "config": config, "folder": PACK_FOLDER}


def start_server(files: dict, log: Path, cache: str):
    from tve.tests.e2e.headless_comfyui import start
    arguments = ["--base-directory", str(files["base"]), "--extra-model-paths-config", str(files["config"]),
                 "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--disable-all-custom-nodes",
                 "--whitelist-custom-nodes", files["folder"]]
    if cache == "none":
        arguments.append("--cache-none")
    return start(Path(os.environ["COMFYUI_PATH"]).resolve(), arguments, log)


def graph_of(workflow: str, object_info: dict, clip: str, frames: int, resize: int, steps: int,
             vae: str = "plain", source_features: str = "live") -> dict:
    from tve.tests.e2e.session_files import CHECKPOINT
    from tve.tests.e2e.ui_workflow import to_api
    graph = to_api(json.loads((ROOT / "workflows" / f"{workflow}.json").read_text()), object_info)
    overrides = {"CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT}, "LoadVideo": {"file": clip},
                 "TVE_OpticalFlow": {"method": "dis", "raft_weights": "none (method dis)"},
                 "TVE_DDIMInversion": {"steps": steps}, "ImageScaleToMaxDimension": {"largest_size": resize},
                 "ImageFromBatch": {"batch_index": 0, "length": frames},
                 "TVE_ApplyFLATTEN": {"source_features": source_features}}
    for node in graph.values():
        for name, value in overrides.get(node["class_type"], {}).items():
            assert name in node["inputs"], f"{node['class_type']} has no input {name}"
            node["inputs"][name] = value
    if vae == "tiled":
        swap_to_tiled_vae(graph, object_info)
    return graph


TILED_VAE = {"VAEEncode": "VAEEncodeTiled", "VAEDecode": "VAEDecodeTiled"}


def swap_to_tiled_vae(graph: dict, object_info: dict) -> None:
    """Core's VAE Encode / Decode replaced by their tiled forms, links kept, the tiled nodes' own widgets at their
    defaults: they code one frame at a time (``comfy.utils.tiled_scale`` loops over the batch), where the plain
    nodes take as many frames per batch as free memory allows (on the CPU: all of them)."""
    for node in graph.values():
        tiled = TILED_VAE.get(node["class_type"])
        if tiled is None:
            continue
        from tve.tests.e2e.ui_workflow import default_of
        required = object_info[tiled]["input"]["required"]
        node["class_type"] = tiled
        node["inputs"] = {name: node["inputs"].get(name, default_of(spec)) for name, spec in required.items()}


# ---------------------------------------------------------------------------------------------- recording
class Recorder:
    """The server's resident set every ``interval_s`` and the node it is executing (websocket messages)."""

    def __init__(self, url: str, pid: int, interval_s: float = 0.01):
        import psutil
        self.process = psutil.Process(pid)
        self.url, self.interval_s = url, interval_s
        self.client_id = uuid.uuid4().hex
        self.samples: list[tuple[float, int]] = []
        self.events: list[tuple[float, str | None]] = []
        self.done = threading.Event()
        self.connected = threading.Event()
        self.threads = [threading.Thread(target=self._sample, daemon=True),
                        threading.Thread(target=lambda: asyncio.run(self._listen()), daemon=True)]

    def __enter__(self) -> "Recorder":
        for t in self.threads:
            t.start()
        if not self.connected.wait(60):
            raise RuntimeError("the server's websocket did not answer")
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        for t in self.threads:
            t.join(timeout=30)

    def rss(self) -> int:
        return self.process.memory_info().rss

    def _sample(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.monotonic(), self.rss()))
            time.sleep(self.interval_s)

    async def _listen(self) -> None:
        import aiohttp
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"{self.url.replace('http', 'ws')}/ws?clientId={self.client_id}") as ws:
                self.connected.set()
                while not self.done.is_set():
                    try:
                        message = await ws.receive(timeout=0.2)
                    except asyncio.TimeoutError:
                        continue
                    if message.type != aiohttp.WSMsgType.TEXT:
                        if message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            return
                        continue
                    data = json.loads(message.data)
                    if data.get("type") == "executing":
                        self.events.append((time.monotonic(), data["data"].get("node")))

    def run(self, graph: dict, timeout_s: float) -> dict:
        import requests
        response = requests.post(self.url + "/prompt", json={"prompt": graph, "client_id": self.client_id},
                                 timeout=60)
        response.raise_for_status()
        prompt_id = response.json()["prompt_id"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = requests.get(f"{self.url}/history/{prompt_id}", timeout=60).json().get(prompt_id)
            if entry is not None:
                return entry
            time.sleep(0.5)
        raise RuntimeError(f"the prompt did not finish within {timeout_s} s")

    def per_node(self, idle: int) -> list[dict]:
        """Per executed node in order: its id, peak resident set while it ran and when it ended, above ``idle``."""
        rows = []
        events = [(t, n) for t, n in self.events]
        for (start, node), (end, _) in zip(events, events[1:] + [(time.monotonic(), None)]):
            if node is None:
                continue
            during = [r for t, r in self.samples if start <= t <= end] or \
                [r for t, r in self.samples if t >= start][:1]                  # a node quicker than a sample
            after = [r for t, r in self.samples if t >= end][:1] or during[-1:]
            rows.append({"node": node, "seconds": end - start, "peak": max(during, default=0) - idle,
                         "end": (after[0] if after else 0) - idle})
        return rows


def measure(files: dict, root: Path, workflow: str, frames: int, cache: str, opts) -> dict:
    clip = f"bench_{frames}f_{opts.clip}.mp4"
    if not (files["base"] / "input" / clip).exists():
        height, width = (int(v) for v in opts.clip.split("x")[::-1])
        write_clip(files["base"] / "input" / clip, frames, height, width)
    server = start_server(files, root / f"server_{workflow}_{frames}_{cache}.log", cache)
    try:
        object_info = server.get("/object_info").json()
        graph = graph_of(workflow, object_info, clip, frames, opts.resize, opts.steps, opts.vae,
                         opts.source_features)
        with Recorder(server.url, server.process.pid) as recorder:
            time.sleep(0.5)
            idle = min(r for _, r in recorder.samples[-20:])
            entry = recorder.run(graph, opts.timeout)
            time.sleep(0.5)
        status = entry["status"]
        if status["status_str"] != "success":
            raise RuntimeError(f"{workflow} at {frames} frames failed: {status['messages']}\n{server.log_tail()}")
        peak = max(r for _, r in recorder.samples)
        nodes = recorder.per_node(idle)
        for row in nodes:
            row["type"] = graph[row["node"]]["class_type"]
        return {"idle": idle, "peak": peak - idle, "nodes": nodes}
    finally:
        server.stop()


def report(workflow: str, cache: str, results: dict, frame_counts: list[int]) -> None:
    print(f"## {workflow}, cache {cache}", flush=True)
    for f in frame_counts:
        r = results[f]
        print(f"  {f} frames: server peak {(r['peak'] + r['idle']) / MIB:.0f} MiB (idle {r['idle'] / MIB:.0f} MiB, "
              f"rise {r['peak'] / MIB:.0f} MiB, {r['peak'] / f / MIB:.1f} MiB/frame)")
    for a, b in zip(frame_counts, frame_counts[1:]):
        slope = (results[b]["peak"] - results[a]["peak"]) / (b - a)
        print(f"  peak rise grows {slope / MIB:.1f} MiB per frame from {a} to {b} frames")
    first, last = frame_counts[0], frame_counts[-1]
    rows = {}
    for f in (first, last):
        for row in results[f]["nodes"]:
            rows.setdefault(row["node"], {})[f] = row
    print(f"  per node (above the idle server; per frame = growth from {first} to {last} frames):")
    for node, by_frames in rows.items():
        if first not in by_frames or last not in by_frames:
            continue
        a, b = by_frames[first], by_frames[last]
        kind = "pack" if a["type"].startswith("TVE_") else "core"
        print(f"    {node:>3} {a['type']:<26} [{kind}] held after {b['end'] / MIB:7.0f} MiB "
              f"({(b['end'] - a['end']) / (last - first) / MIB:+6.2f} MiB/frame), peak while running "
              f"{b['peak'] / MIB:7.0f} MiB ({(b['peak'] - a['peak']) / (last - first) / MIB:+6.2f} MiB/frame), "
              f"{b['seconds']:.1f} s at {last} frames", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workflows", nargs="+", default=["tokenflow_edit", "flatten_edit"])
    ap.add_argument("--frames", type=int, nargs="+", default=[12, 48, 120])
    ap.add_argument("--clip", default="854x480", help="source clip size WxH")
    ap.add_argument("--resize", type=int, default=128, help="ImageScaleToMaxDimension's long side")
    ap.add_argument("--steps", type=int, default=2, help="DDIM inversion steps (the edit samples on its grid)")
    ap.add_argument("--cache", nargs="+", default=["default"], choices=["default", "none"])
    ap.add_argument("--vae", default="plain", choices=["plain", "tiled"],
                    help="tiled: core's VAE Encode / Decode (Tiled) in place of the shipped plain ones")
    ap.add_argument("--source-features", default="live", choices=["live", "stored"],
                    help="Apply FLATTEN's source_features in the FLATTEN workflows")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--keep", help="a folder to keep the session (server logs, clips) in")
    opts = ap.parse_args()
    if not os.environ.get("COMFYUI_PATH"):
        raise SystemExit("needs the real host: set COMFYUI_PATH")
    _tve.real_host()                   # comfy in this process too: the e2e checkpoint writer builds comfy's shapes
    root = Path(opts.keep) if opts.keep else Path(tempfile.mkdtemp(prefix="tve_workflow_memory_"))
    root.mkdir(parents=True, exist_ok=True)
    files = session(root)
    _timing.header(f"whole-workflow memory, clip {opts.clip}, resized to {opts.resize} px, {opts.steps} DDIM steps, "
                   f"tiny SD1.5 checkpoint, server on the CPU, {opts.vae} VAE nodes, FLATTEN source features "
                   f"{opts.source_features}")
    for workflow in opts.workflows:
        for cache in opts.cache:
            results = {f: measure(files, root, workflow, f, cache, opts) for f in opts.frames}
            report(workflow, cache, results, opts.frames)
    print(f"# session folder: {root}")


if __name__ == "__main__":
    main()
