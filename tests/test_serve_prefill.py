"""The batcher's staged admissions (infer.staging): long prompts prefilled in chunks between the
running slots' decode calls, and prompt prefixes reused from the prefix cache. In this process,
a tiny model with a 4,608-token context on one device (and on fsdp_tp over 8 emulated devices);
every answer is compared with `infer.generate` (one-shot prefill, no cache) token for token."""

import threading

import httpx
import jax
import numpy as np
import pytest

from infer import generate
from infer.app import Service, create_app
from infer.batcher import Batcher, Request
from infer.engine import Engine
from infer.events import Finished, Token
from llama_jax.decoding.sampling import Sampling
from llama_jax.decoding.staged import block_bytes
from llama_jax.params import init_params
from tiny import LLAMA3_LIKE

CONFIG = LLAMA3_LIKE.replace(max_seq_len=4608)
CONTEXT = 4352
CHUNK = 512
BLOCK = 16
LONG = 4000  # tokens of the long prompt: 8 chunks of 512 (the last one 416)
SYSTEM = 1000  # tokens of the shared system prompt: 62 whole blocks, 8 tokens over
SLOTS = 4


def ids(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, n).tolist()


class Recorder:
    """A request's tokens (each with the batcher's piece and decode-call counts when it came) and
    an Event set at its Finished."""

    def __init__(self, batcher=None):
        self.batcher, self.tokens, self.seen, self.done = batcher, [], [], threading.Event()
        self.first = threading.Event()

    def __call__(self, event):
        if isinstance(event, Token):
            self.tokens.append(event.id)
            if self.batcher is not None:
                load = self.batcher.load()
                self.seen.append((load["prefill_pieces"], load["decode_calls"]))
            self.first.set()
        elif isinstance(event, Finished):
            self.done.set()


def run(batcher, prompt, max_tokens, sampling=Sampling(), seed=0, timeout=300):
    recorder = Recorder()
    batcher.submit(Request(prompt, max_tokens, sampling, seed, recorder))
    assert recorder.done.wait(timeout)
    return recorder.tokens


def expected(params, prompt, max_tokens, temperature=0.0, seed=0):
    return generate(params, None, [prompt], max_new_tokens=max_tokens, temperature=temperature, seed=seed,
                    config=CONFIG, stop_ids=[])[0].tokens


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(5))


@pytest.fixture(scope="module")
def batcher(params):
    """4 slots, chunks of 512, a prefix cache of 1 MiB (512 blocks), one decode step per call."""
    engine = Engine(CONFIG, prefill_chunk=CHUNK)
    running = Batcher(engine, engine.place_params(params), SLOTS, CONTEXT, [], steps_per_call=1,
                      prefill_batch=SLOTS, prefix_cache_mb=1)
    running.start()
    yield running
    running.stop(timeout=60)


def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_streams_decode_calls(batcher, params):
    short = Recorder(batcher)
    batcher.submit(Request(ids(12, 1), 40, Sampling(), 0, short))
    assert short.first.wait(120)
    long_prompt = ids(LONG, 2)
    long = Recorder()
    before = batcher.load()["prefill_pieces"]
    batcher.submit(Request(long_prompt, 6, Sampling(), 0, long))
    assert long.done.wait(300) and short.done.wait(300)
    pieces = batcher.load()["prefill_pieces"] - before
    assert pieces == 8  # ceil(4000 / 512)
    # Between each chunk and the next the short stream got a token: one decode call (one step a call).
    between = [sum(1 for p, _ in short.seen if p == before + k) for k in range(1, pieces)]
    assert between == [1] * (pieces - 1), short.seen
    assert long.tokens == expected(params, long_prompt, 6)
    assert short.tokens == expected(params, ids(12, 1), 40)


def test_a_second_request_with_the_same_system_prompt_computes_only_its_suffix(batcher, params):
    system = ids(SYSTEM, 3)
    first, second = system + ids(20, 4), system + ids(30, 5)
    computed = batcher.load()["prefill_tokens"]
    assert run(batcher, first, 8) == expected(params, first, 8)
    assert batcher.load()["prefill_tokens"] - computed == len(first)
    computed, saved = batcher.load()["prefill_tokens"], batcher.load()["prefix_cache"]["prefill_tokens_saved"]
    assert run(batcher, second, 8) == expected(params, second, 8)
    # 62 whole blocks (992 tokens) of the system prompt are reused; its last 8 tokens and the suffix computed.
    assert batcher.load()["prefill_tokens"] - computed == SYSTEM % BLOCK + 30
    assert batcher.load()["prefix_cache"]["prefill_tokens_saved"] - saved == SYSTEM // BLOCK * BLOCK
    # Seeded sampling reads the cached prefix too, and equals generate with that seed.
    sampled = run(batcher, system + ids(7, 6), 12, Sampling(0.9), seed=11)
    assert sampled == expected(params, system + ids(7, 6), 12, temperature=0.9, seed=11)
    # A chat's next turn: the earlier prompt's blocks are reused.
    turn = second + expected(params, second, 8) + ids(9, 7)
    computed = batcher.load()["prefill_tokens"]
    assert run(batcher, turn, 5) == expected(params, turn, 5)
    assert batcher.load()["prefill_tokens"] - computed == len(turn) - len(second) // BLOCK * BLOCK


def test_n_choices_of_one_prompt_compute_it_once(batcher, params):
    prompt = ids(300, 8)
    computed = batcher.load()["prefill_tokens"]
    recorders = [Recorder() for _ in range(3)]
    for i, recorder in enumerate(recorders):  # as the server submits a request's n choices: seed + i
        batcher.submit(Request(prompt, 6, Sampling(0.8), 40 + i, recorder))
    assert all(r.done.wait(300) for r in recorders)
    for i, recorder in enumerate(recorders):
        assert recorder.tokens == expected(params, prompt, 6, temperature=0.8, seed=40 + i)
    # The first computes all 300; the others wait for it, then reuse 18 blocks and compute 12 each.
    assert batcher.load()["prefill_tokens"] - computed == 300 + 2 * (300 - 18 * BLOCK)


def test_health_reports_the_prefix_caches_hit_rate_and_tokens_saved(batcher):
    service = Service(batcher, None, "tiny", CONTEXT, None, 1 << 20, 16)
    transport = httpx.ASGITransport(app=create_app(service))

    async def health():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get("/health")).json()

    import asyncio
    body = asyncio.run(health())
    cache = body["prefix_cache"]
    assert cache["block_tokens"] == BLOCK and cache["blocks"] == 2**20 // block_bytes(CONFIG, BLOCK)
    assert cache["prefill_tokens_saved"] > 0 and 0 < cache["hit_rate"] < 1
    assert body["prefill_tokens"] == batcher.load()["prefill_tokens"] > 0


def test_a_tiny_prefix_cache_evicts_and_answers_stay_correct(params):
    engine = Engine(CONFIG, prefill_chunk=CHUNK)
    four_blocks = 4 * block_bytes(CONFIG, BLOCK) / 2**20
    batcher = Batcher(engine, engine.place_params(params), SLOTS, 512, [], steps_per_call=2, prefill_batch=SLOTS,
                      prefix_cache_mb=four_blocks)
    batcher.start()
    try:
        a, b = ids(70, 9), ids(90, 10)
        prompts = [a + [1, 2], b + [3], a + [4], b + [5, 6], a[:40] + [7]]
        for prompt in prompts:
            assert run(batcher, prompt, 5) == expected(params, prompt, 5)
        cache = batcher.load()["prefix_cache"]
        assert cache["blocks"] == 4 and cache["blocks_used"] == 4 and cache["evicted"] > 0
    finally:
        batcher.stop(timeout=60)
