"""A headless ComfyUI server in a child process (CPU): start, queue API graphs, read results, stop.

No wait here depends on the machine's speed. Every wait polls its condition for as long as the server process lives
and shows progress, and fails when the process exits or when nothing has progressed for ``STALL_S`` (a server that
hangs, not one that is slow). Progress is what can be observed from outside: the server's log growing (start-up,
model loading, "Prompt executed"), a message on the session's websocket (queue status, a node starting, a sampler
step or a node's progress bar, a node's output), or a signal the caller adds (the graph editor's own websocket).
An HTTP request that gets no answer within ``REQUEST_S`` is sent again under the same rule: a busy server answers
late, a dead one never; a prompt is posted with its own id, so a retried POST never queues it twice.
"""
from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable, TypeVar

import requests

POLL_S = 0.5
REQUEST_S = 30            # one HTTP attempt; a slower answer is asked for again, not a failure
STALL_S = 900             # no log output and no websocket message for this long: the server hangs

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class HeadlessComfyUI:
    url: str
    process: subprocess.Popen
    log: Path
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)   # the session's websocket and its prompts
    messages: int = 0                                # websocket messages received so far (a progress signal)

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def progress(self) -> tuple:
        """What changes while the server works: its log's size and the websocket messages received."""
        return self.log.stat().st_size, self.messages

    def until(self, done: Callable[[], T | None], what: str, progress: Callable[[], Hashable] = tuple) -> T:
        """Poll ``done()`` until it returns something other than None; fail if the server exits or neither it nor
        ``progress()`` (the caller's own signal) changes for ``STALL_S``."""
        seen, since = (self.progress(), progress()), time.monotonic()
        while True:
            result = done()
            if result is not None:
                return result
            if self.process.poll() is not None:
                raise AssertionError(f"{what}: the server exited with {self.process.returncode}:\n{self.log_tail()}")
            now = (self.progress(), progress())
            if now != seen:
                seen, since = now, time.monotonic()
            elif time.monotonic() - since > STALL_S:
                raise AssertionError(f"{what}: no progress for {STALL_S} s (no log output, no websocket message; "
                                     f"the server hangs):\n{self.log_tail()}")
            time.sleep(POLL_S)

    def request(self, method: str, path: str, progress: Callable[[], Hashable] = tuple,
                **kwargs) -> requests.Response:
        """One answer to ``method path``, asked again while the server is too busy to answer in ``REQUEST_S``."""
        def attempt() -> requests.Response | None:
            try:
                return requests.request(method, self.url + path, timeout=REQUEST_S, **kwargs)
            except (requests.Timeout, requests.ConnectionError):
                return None
        return self.until(attempt, f"{method} {path}", progress)

    def get(self, path: str, progress: Callable[[], Hashable] = tuple, **params) -> requests.Response:
        response = self.request("GET", path, progress, params=params)
        response.raise_for_status()
        return response

    def knows(self, prompt_id: str) -> bool:
        """Whether ``prompt_id`` is queued, running or finished."""
        if prompt_id in self.get(f"/history/{prompt_id}").json():
            return True
        queue = self.get("/queue").json()
        return any(item[1] == prompt_id for item in queue["queue_running"] + queue["queue_pending"])

    def queue(self, graph: dict) -> tuple[int, dict]:
        """POST ``graph`` to /prompt with the session's client id (its progress comes on the session's websocket);
        returns the status and the body (``prompt_id`` and ``node_errors``; ``error`` too when refused)."""
        prompt_id = str(uuid.uuid4())
        body = {"prompt": graph, "client_id": self.client_id, "prompt_id": prompt_id}

        def post() -> tuple[int, dict] | None:
            if self.knows(prompt_id):                  # an earlier attempt got through but its answer did not
                return 200, {"prompt_id": prompt_id, "node_errors": {}}
            try:
                response = requests.post(self.url + "/prompt", data=json.dumps(body),     # NaN probes: allow_nan
                                         headers={"Content-Type": "application/json"}, timeout=REQUEST_S)
            except (requests.Timeout, requests.ConnectionError):
                return None
            return response.status_code, response.json()
        return self.until(post, "POST /prompt")

    def run(self, graph: dict) -> dict:
        """Queue ``graph`` and wait for it; returns its /history entry (``status``, ``outputs``)."""
        status, body = self.queue(graph)
        if status != 200:
            raise AssertionError(f"POST /prompt refused the graph ({status}): {body}")
        return self.wait(body["prompt_id"])

    def wait(self, prompt_id: str, progress: Callable[[], Hashable] = tuple) -> dict:
        """The /history entry (``status``, ``outputs``) of the queued prompt ``prompt_id``, once it has finished.
        ``progress``: a further signal of the run's progress (e.g. the graph editor's websocket)."""
        def finished() -> dict | None:                  # history holds a prompt once it has finished
            return self.get(f"/history/{prompt_id}", progress).json().get(prompt_id)
        return self.until(finished, f"prompt {prompt_id}", progress)

    def watch(self) -> None:
        """Count the messages of the session's websocket (``/ws?clientId=``) in a daemon thread, reconnecting while
        the server lives. aiohttp comes with ComfyUI."""
        import aiohttp

        async def listen() -> None:
            address = self.url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
            while self.process.poll() is None:
                try:
                    async with aiohttp.ClientSession() as session, session.ws_connect(address) as ws:
                        async for _ in ws:
                            self.messages += 1
                except (aiohttp.ClientError, OSError):
                    pass
                await asyncio.sleep(POLL_S)
        threading.Thread(target=asyncio.run, args=(listen(),), daemon=True, name="comfyui-ws").start()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)          # a bounded shutdown; then it is killed
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start(comfyui: Path, arguments: list[str], log: Path) -> HeadlessComfyUI:
    """Run ``main.py --cpu`` of the checkout ``comfyui`` with ``arguments``; returns once it answers HTTP (waiting
    while it starts up, i.e. while its log grows) and its websocket is being watched."""
    port = free_port()
    command = [sys.executable, "-u", "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", *arguments]
    with log.open("w", encoding="utf-8") as sink:
        process = subprocess.Popen(command, cwd=comfyui, stdout=sink, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    server = HeadlessComfyUI(f"http://127.0.0.1:{port}", process, log)
    try:
        server.get("/queue")
    except BaseException:
        server.stop()
        raise
    server.watch()
    return server
