"""The batcher's worker failing: every request ends, in the batcher and over HTTP.

In this process: a tiny model on one device, the batcher's compiled prefill replaced by
one that raises (the failure a real worker meets as an XLA error or an out-of-memory), and
the server's app (`infer.app.create_app`) driven through httpx's ASGI transport.
"""

import asyncio
import dataclasses
import json
import threading

import httpx
import jax
import pytest

from infer.batcher import Batcher
from infer.requests import Request, WorkerFailed
from infer.engine import Engine
from infer.events import Finished
from infer.app import Service, create_app
from llama_jax.config import ModelConfig
from llama_jax.decoding.sampling import Sampling
from llama_jax.params import init_params
from llama_jax.text.tokenizer import load_tokenizer
from llama_jax.text.tokenizer_training import train_bpe

MODEL = "tiny"
CONTEXT = 64


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_bpe(["The llama is a domesticated South American camelid."] * 20, 300, path)
    return load_tokenizer(path)


@pytest.fixture(scope="module")
def engine_and_params(tokenizer):
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=tokenizer.vocab_size,
                         max_seq_len=CONTEXT)
    engine = Engine(config)
    return engine, engine.place_params(init_params(config, jax.random.key(0)))


class Recorder:
    """A request's events, and an Event set when its Finished arrives."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, Finished):
            self.done.set()


def failing_batcher(engine_and_params, tokenizer, entered: threading.Event, release: threading.Event) -> Batcher:
    """A started batcher whose prefill sets `entered`, waits for `release`, then raises."""
    engine, params = engine_and_params
    batcher = Batcher(engine, params, 2, CONTEXT, tokenizer.stop_ids, steps_per_call=1, prefill_batch=1)

    def prefill(*args):
        entered.set()
        release.wait(30)
        raise RuntimeError("prefill failed (a test's failure)")

    batcher.programs = dataclasses.replace(batcher.programs, prefill=prefill)
    batcher.start()
    return batcher


def request(emit) -> Request:
    return Request([1, 2, 3], 4, Sampling(), 0, emit)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_prefill_failure_ends_every_request_and_later_ones_are_refused(engine_and_params, tokenizer):
    entered, release = threading.Event(), threading.Event()
    batcher = failing_batcher(engine_and_params, tokenizer, entered, release)
    first = Recorder()
    batcher.submit(request(first))
    assert entered.wait(30)  # `first` is in its slot, mid-prefill
    queued = Recorder()
    batcher.submit(request(queued))  # waiting while the prefill fails
    release.set()
    for recorder in (first, queued):
        assert recorder.done.wait(30), "a request was left without a Finished"
        assert recorder.events[-1] == Finished("error")
    batcher._thread.join(30)
    # A request that passed the server's `batcher.error is None` check just before the failure:
    late = Recorder()
    with pytest.raises(WorkerFailed, match="generation worker failed"):
        batcher.submit(request(late))
    assert batcher.load()["waiting"] == 0 and batcher.load()["running"] == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_http_requests_in_flight_when_the_worker_fails_all_return(engine_and_params, tokenizer):
    entered, release = threading.Event(), threading.Event()
    batcher = failing_batcher(engine_and_params, tokenizer, entered, release)
    service = Service(batcher, tokenizer, MODEL, CONTEXT, None, 1 << 16, 16)
    app = create_app(service)

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            def post(stream):
                return client.post("/v1/completions", json={"model": MODEL, "prompt": "The llama", "max_tokens": 4,
                                                             "stream": stream})

            whole = asyncio.create_task(post(False))
            await asyncio.to_thread(entered.wait, 30)
            streamed = asyncio.create_task(post(True))  # queued while the prefill is failing
            await asyncio.sleep(0.2)
            release.set()
            answers = await asyncio.wait_for(asyncio.gather(whole, streamed), 60)
            after = await asyncio.wait_for(post(False), 60)
            return answers, after

    (whole, streamed), after = asyncio.run(scenario())
    assert whole.status_code == 500 and whole.json()["error"]["type"] == "server_error"
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
    assert streamed.status_code == 200 and any("error" in event for event in events)
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert after.status_code == 503 and "worker failed" in after.json()["error"]["message"]
