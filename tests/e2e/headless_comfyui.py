"""A headless ComfyUI server in a child process (CPU): start, queue API graphs, read results, stop."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import requests

POLL_S = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class HeadlessComfyUI:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 60) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def get(self, path: str, **params) -> requests.Response:
        response = requests.get(self.url + path, params=params, timeout=60)
        response.raise_for_status()
        return response

    def run(self, graph: dict, timeout_s: float) -> dict:
        """Queue ``graph`` and wait for it; returns its /history entry (``status``, ``outputs``)."""
        response = requests.post(self.url + "/prompt", json={"prompt": graph, "client_id": uuid.uuid4().hex},
                                 timeout=60)
        if response.status_code != 200:
            raise AssertionError(f"POST /prompt refused the graph ({response.status_code}): {response.text}")
        return self.wait(response.json()["prompt_id"], timeout_s)

    def wait(self, prompt_id: str, timeout_s: float) -> dict:
        """The /history entry (``status``, ``outputs``) of the queued prompt ``prompt_id``, once it has finished."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").json().get(prompt_id)
            if entry is not None:                        # history holds a prompt once it has finished
                return entry
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            time.sleep(POLL_S)
        raise AssertionError(f"prompt {prompt_id} did not finish within {timeout_s} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)


def start(comfyui: Path, arguments: list[str], log: Path, timeout_s: float) -> HeadlessComfyUI:
    """Run ``main.py --cpu`` of the checkout ``comfyui`` with ``arguments``; returns once it answers HTTP."""
    port = free_port()
    command = [sys.executable, "-u", "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", *arguments]
    with log.open("w", encoding="utf-8") as sink:
        process = subprocess.Popen(command, cwd=comfyui, stdout=sink, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    server = HeadlessComfyUI(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with {process.returncode} while starting:\n{server.log_tail()}")
        try:
            requests.get(server.url + "/queue", timeout=5).raise_for_status()
            return server
        except requests.RequestException:
            time.sleep(POLL_S)
    server.stop()
    raise RuntimeError(f"ComfyUI did not answer within {timeout_s} s:\n{server.log_tail()}")
