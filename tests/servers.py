"""Starting `python -m infer.serve` (and other local services) from tests, on 127.0.0.1.

    with Server(checkpoint, "--port", free_port()) as server:   # waits for "serving on"
        httpx.get(f"{server.base}/health")

A server runs on one CPU device (the 8 emulated ones are for layout tests) and without an
API key from the caller's environment unless one is passed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 900  # seconds: start-up compiles on a 2-core machine shared with other work


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**overrides: str) -> dict:
    """This process's environment for a server: one CPU device, no inherited API key."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    env.pop("LLAMA_JAX_API_KEY", None)
    env.update(overrides)
    return env


def serve(checkpoint, *flags) -> list[str]:
    """The command line of `python -m infer.serve --checkpoint CHECKPOINT FLAGS...`."""
    return [sys.executable, "-m", "infer.serve", "--checkpoint", str(checkpoint), *map(str, flags)]


class Server:
    """A started server process: its stderr lines as they come (a reader thread), and its
    address once it prints "serving on". Flags must include --port."""

    def __init__(self, checkpoint, *flags, env: dict | None = None):
        flags = list(map(str, flags))
        self.port = int(flags[flags.index("--port") + 1])
        self.base = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(serve(checkpoint, *flags), cwd=REPO, env=env or environment(),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.serving = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stderr:
            self.lines.append(line)
            if line.startswith("serving "):
                self.serving.set()

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def wait_until_serving(self, timeout: float = START_TIMEOUT) -> "Server":
        """Block until the server listens; fail the test with its output if it does not."""
        if not self.serving.wait(timeout):
            self.stop()
            pytest.fail(f"the server did not start: {self.stderr}")
        return self

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def __enter__(self) -> "Server":
        return self.wait_until_serving()

    def __exit__(self, *exc):
        self.stop()
