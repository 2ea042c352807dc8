"""`python -m infer.serve` starting up and bounding its clients (infer.listener).

Bad flags and a port in use end the command in one line before anything loads. One
server process with tight bounds (a 2 s body timeout, 4 connections per client address,
a non-ASCII API key, a 0.5 s shutdown timeout) is then probed over raw sockets; the last
test stops it with SIGTERM in the middle of a long stream.
"""

import json
import signal
import socket
import subprocess
import time

import httpx
import pytest
import torch

from llama_jax.config import ModelConfig
from llama_jax.text.tokenizer import load_tokenizer
from llama_jax.text.tokenizer_training import train_bpe
from servers import REPO, Server, environment, free_port, serve
from tiny import hf_model

KEY = "clé-ключ-🔑"  # not ASCII: sent as UTF-8 bytes
CONTEXT = 1024  # room for a stream long enough to outlast the shutdown timeout
BODY_TIMEOUT = 2.0
PER_CLIENT = 4
OTHER_CLIENT = "127.0.0.2"  # another client address on the loopback


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    train_bpe(["The llama is a domesticated South American camelid, used as a pack animal."] * 30, 300,
              directory / "tokenizer.model")
    tokenizer = load_tokenizer(directory)
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=tokenizer.vocab_size,
                         max_seq_len=CONTEXT)
    model = hf_model(config, seed=1)
    with torch.no_grad():  # stop tokens' logits 0, below the largest of 550 others: greedy answers never stop
        model.lm_head.weight[sorted(tokenizer.stop_ids)] = 0
    model.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("flags, fragment", [
    (["--port", "99999"], "--port must be in [0, 65535]"),
    (["--max-waiting", "0"], "--max-waiting must be at least 1, got 0"),
    (["--body-timeout", "0"], "--body-timeout must be above 0 seconds"),
    (["--max-connections-per-client", "0"], "--max-connections-per-client must be at least 1"),
])
def test_a_bad_flag_is_one_line_and_a_nonzero_exit_before_anything_loads(checkpoint, flags, fragment):
    done = subprocess.run(serve(checkpoint, *flags), cwd=REPO, env=environment(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0 and done.stderr.count("\n") == 1 and fragment in done.stderr, done.stderr
    assert "serving" not in done.stderr and "compiling" not in done.stderr


def test_a_port_in_use_is_one_line_before_loading(checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(serve(checkpoint, "--port", port), cwd=REPO, env=environment(), capture_output=True,
                              text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.count("\n") == 1, done.stderr
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in done.stderr and "in use" in done.stderr
    assert "compiling" not in done.stderr and "serving" not in done.stderr


@pytest.fixture(scope="module")
def server(checkpoint):
    port = free_port()
    running = Server(checkpoint, "--model-name", "tiny", "--port", port, "--api-key", KEY, "--max-batch", 2,
                     "--prefill-batch", 1, "--steps-per-call", 1, "--body-timeout", BODY_TIMEOUT,
                     "--max-connections-per-client", PER_CLIENT, "--shutdown-timeout", 0.5)
    with running.wait_until_serving():
        yield running


def authorized(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}".encode()}  # httpx sends str headers as ASCII only


def test_serving_is_announced_once_the_server_listens_on_the_port_it_names(server):
    line = next(line for line in server.lines if line.startswith("serving "))
    assert line.strip() == f"serving tiny on http://127.0.0.1:{server.port}/v1"
    assert httpx.get(f"{server.base}/health", timeout=5).status_code == 200  # at once: no retries


def test_a_non_ascii_api_key_is_compared_as_utf8(server):
    body = {"model": "tiny", "prompt": "The llama", "max_tokens": 2}
    assert httpx.post(f"{server.base}/v1/completions", json=body, headers=authorized(), timeout=30).status_code == 200
    wrong = httpx.post(f"{server.base}/v1/completions", json=body, headers=authorized("clé"), timeout=30)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"


def connect(server, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=BODY_TIMEOUT + 10,
                                    source_address=(source, 0))
    return sock


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (socket.timeout if it never does)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_stalled_body_gets_408_and_its_connection_closed_while_others_are_served(server):
    body = json.dumps({"model": "tiny", "prompt": "The llama", "max_tokens": 2}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with connect(server) as stalled_body, connect(server) as stalled_head:
        stalled_body.sendall(head + body[:len(body) // 2])
        stalled_head.sendall(head[:20])
        start = time.monotonic()
        served = httpx.post(f"{server.base}/v1/completions", content=body, timeout=30,
                            headers={**authorized(), "Content-Type": "application/json"})
        assert served.status_code == 200  # while both stall
        answer = read_to_end(stalled_body)
        assert answer.startswith(b"HTTP/1.1 408 ") and b"--body-timeout" in answer
        assert read_to_end(stalled_head) == b""  # no request to answer: closed
        assert time.monotonic() - start < BODY_TIMEOUT + 5


def test_one_address_holds_at_most_its_connections_while_others_are_served(server):
    held = [connect(server, OTHER_CLIENT) for _ in range(PER_CLIENT)]
    try:
        with connect(server, OTHER_CLIENT) as one_more:
            answer = read_to_end(one_more)
        assert answer.startswith(b"HTTP/1.1 429 ") and b"too many connections from this address" in answer
        assert httpx.get(f"{server.base}/health", timeout=10).status_code == 200  # another address
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # their slots free as the server sees them close
        with connect(server, OTHER_CLIENT) as again:
            again.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = read_to_end(again)
        if answer.startswith(b"HTTP/1.1 200 ") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert answer.startswith(b"HTTP/1.1 200 "), answer


def test_sigterm_past_the_shutdown_timeout_ends_the_stream_with_an_error_and_no_traceback(server):
    """Last: it stops the module's server. The answer would take longer than the shutdown timeout."""
    lines = []
    with httpx.stream("POST", f"{server.base}/v1/completions", headers=authorized(), timeout=60,
                      json={"model": "tiny", "prompt": "The llama", "max_tokens": CONTEXT - 16, "stream": True,
                            "temperature": 0}) as answer:
        for line in answer.iter_lines():
            if not lines:
                server.process.send_signal(signal.SIGTERM)
            lines.append(line)
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "shut down before this answer was finished" in events[-1]["error"]["message"]
    assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
    assert len(events) < CONTEXT - 16  # cut short
    assert server.process.wait(timeout=60) == 0
    time.sleep(0.5)  # the reader thread takes the last lines
    assert "Traceback" not in server.stderr, server.stderr
