"""The batcher's staged admissions (infer.staging): long prompts prefilled in chunks between the
running slots' decode calls, and prompt prefixes reused from the prefix cache. In this process,
a tiny model with a 4,608-token context on one device (and on fsdp_tp over 8 emulated devices);
every answer is compared with `infer.generate` (one-shot prefill, no cache) token for token."""

import asyncio
import threading

import httpx
import jax
import numpy as np
import pytest

from infer import generate
from infer.app import Service, create_app
from infer.batcher import Batcher
from infer.requests import Request
from infer.engine import Engine
from infer.events import Finished, Token
from infer.serve import check_flags, parse_args
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


def sampled(params, prompt, max_tokens, seed):
    """`generate`'s answer at temperature 0.8 with `seed` (one row: the batcher's seeds are per request)."""
    return generate(params, None, [prompt], max_new_tokens=max_tokens, temperature=0.8, seed=seed,
                    config=CONFIG, stop_ids=[])[0].tokens


LONG_PROMPT = ids(LONG, 2)
SYSTEM_PROMPT = ids(SYSTEM, 3)
CHAT_FIRST, CHAT_SECOND = SYSTEM_PROMPT + ids(20, 4), SYSTEM_PROMPT + ids(30, 5)
CHAT_TURN = CHAT_SECOND + ids(8, 6) + ids(9, 7)  # the second chat, its answer and the next user turn
SAMPLED = SYSTEM_PROMPT + ids(7, 6)  # 1,007 tokens, as the n choices' prompt: one compiled `generate`
N_PROMPT = ids(SYSTEM + 7, 8)
# In a cache of 4 blocks: the second reuses the first's 4 blocks, the third evicts them, the fourth
# reuses the third's, the last finds nothing of its prefix left.
EVICTED = [ids(70, 9) + [1, 2], ids(70, 9) + [4], ids(90, 10) + [3], ids(90, 10) + [5, 6], ids(70, 9) + [7]]
MEANWHILE = ids(20, 12)  # a short prompt that arrives while the long one is staged
GREEDY = [ids(12, 1), CHAT_FIRST, CHAT_SECOND, CHAT_TURN, *EVICTED, MEANWHILE]
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(5))


@pytest.fixture(scope="module")
def greedy(params):
    """`generate`'s greedy answers (NEW_TOKENS each) to the GREEDY prompts in one ragged batch, and to
    the long prompt alone."""
    answers = generate(params, None, GREEDY, max_new_tokens=NEW_TOKENS, config=CONFIG, stop_ids=[])
    answers += generate(params, None, [LONG_PROMPT], max_new_tokens=6, config=CONFIG, stop_ids=[])
    return {tuple(prompt): answer.tokens for prompt, answer in zip(GREEDY + [LONG_PROMPT], answers)}


def expected(greedy, prompt, max_tokens):
    return greedy[tuple(prompt)][:max_tokens]


@pytest.fixture(scope="module")
def engine():
    return Engine(CONFIG, prefill_chunk=CHUNK)


def started(engine, params, prefix_cache_mb):
    """A started batcher: 4 slots, chunks of 512, one decode step per call."""
    batcher = Batcher(engine, engine.place_params(params), SLOTS, CONTEXT, [], steps_per_call=1,
                      prefill_batch=SLOTS, prefix_cache_mb=prefix_cache_mb)
    batcher.start()
    return batcher


@pytest.fixture(scope="module")
def batcher(engine, params):
    """With a prefix cache of 1 MiB (512 blocks)."""
    running = started(engine, params, 1)
    yield running
    running.stop(timeout=60)


def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_streams_decode_calls(batcher, greedy):
    short = Recorder(batcher)
    batcher.submit(Request(ids(12, 1), 40, Sampling(), 0, short))
    assert short.first.wait(120)
    long_prompt = LONG_PROMPT
    long = Recorder()
    before = batcher.load()["prefill_pieces"]
    batcher.submit(Request(long_prompt, 6, Sampling(), 0, long))
    assert long.done.wait(300) and short.done.wait(300)
    pieces = batcher.load()["prefill_pieces"] - before
    assert pieces == 8  # ceil(4000 / 512)
    # Between each chunk and the next the short stream got a token: one decode call (one step a call).
    between = [sum(1 for p, _ in short.seen if p == before + k) for k in range(1, pieces)]
    assert between == [1] * (pieces - 1), short.seen
    assert long.tokens == expected(greedy, long_prompt, 6)
    assert short.tokens == expected(greedy, ids(12, 1), 40)


def test_a_short_prompt_arriving_while_a_long_one_is_staged_does_not_wait_for_it(batcher, greedy):
    """With the prefix cache every text prompt is staged, one group at a time; a short prompt that
    does not start like the staged one is prefilled whole at once instead of after the group."""
    running = Recorder(batcher)
    batcher.submit(Request(ids(12, 1), 40, Sampling(), 0, running))  # a stream to interleave the pieces with
    assert running.first.wait(120)
    before = batcher.load()["prefill_pieces"]
    long, short = Recorder(), Recorder(batcher)
    batcher.submit(Request(LONG_PROMPT, 6, Sampling(), 0, long))
    while batcher.load()["prefill_pieces"] == before and not long.done.is_set():
        running.first.wait(0.01)
    batcher.submit(Request(MEANWHILE, 4, Sampling(), 0, short))
    assert short.done.wait(300) and long.done.wait(300) and running.done.wait(300)
    assert short.seen[0][0] - before < 8, short.seen  # its first token came before the long's 8th piece
    assert short.tokens == expected(greedy, MEANWHILE, 4)
    assert long.tokens == expected(greedy, LONG_PROMPT, 6)


def test_a_second_request_with_the_same_system_prompt_computes_only_its_suffix(batcher, params, greedy):
    computed = batcher.load()["prefill_tokens"]
    assert run(batcher, CHAT_FIRST, 8) == expected(greedy, CHAT_FIRST, 8)
    assert batcher.load()["prefill_tokens"] - computed == len(CHAT_FIRST)
    computed, saved = batcher.load()["prefill_tokens"], batcher.load()["prefix_cache"]["prefill_tokens_saved"]
    assert run(batcher, CHAT_SECOND, 8) == expected(greedy, CHAT_SECOND, 8)
    # 62 whole blocks (992 tokens) of the system prompt are reused; its last 8 tokens and the suffix computed.
    assert batcher.load()["prefill_tokens"] - computed == SYSTEM % BLOCK + 30
    assert batcher.load()["prefix_cache"]["prefill_tokens_saved"] - saved == SYSTEM // BLOCK * BLOCK
    # Seeded sampling reads the cached prefix too, and equals generate with that seed.
    assert run(batcher, SAMPLED, 12, Sampling(0.8), seed=11) == sampled(params, SAMPLED, 12, 11)
    # A chat's next turn: the earlier prompt's whole blocks are reused (answers are not cached).
    computed = batcher.load()["prefill_tokens"]
    assert run(batcher, CHAT_TURN, 5) == expected(greedy, CHAT_TURN, 5)
    assert batcher.load()["prefill_tokens"] - computed == len(CHAT_TURN) - len(CHAT_SECOND) // BLOCK * BLOCK


def test_n_choices_of_one_prompt_compute_it_once(batcher, params):
    computed = batcher.load()["prefill_tokens"]
    recorders = [Recorder() for _ in range(3)]
    for i, recorder in enumerate(recorders):  # as the server submits a request's n choices: seed + i
        batcher.submit(Request(N_PROMPT, 12, Sampling(0.8), 40 + i, recorder))
    assert all(r.done.wait(300) for r in recorders)
    for i, recorder in enumerate(recorders):
        assert recorder.tokens == sampled(params, N_PROMPT, 12, 40 + i)
    # The first computes all 1,007; the others wait for it, then reuse 62 blocks and compute 15 each.
    assert batcher.load()["prefill_tokens"] - computed == len(N_PROMPT) + 2 * (len(N_PROMPT) - 62 * BLOCK)


def test_health_reports_the_prefix_caches_hit_rate_and_tokens_saved(batcher):
    service = Service(batcher, None, "tiny", CONTEXT, None, 1 << 20, 16)
    transport = httpx.ASGITransport(app=create_app(service))

    async def health():
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return (await client.get("/health")).json()

    body = asyncio.run(health())
    cache = body["prefix_cache"]
    assert cache["block_tokens"] == BLOCK and cache["blocks"] == 2**20 // block_bytes(CONFIG, BLOCK)
    assert cache["prefill_tokens_saved"] > 0 and 0 < cache["hit_rate"] < 1
    assert body["prefill_tokens"] == batcher.load()["prefill_tokens"] > 0


def test_a_tiny_prefix_cache_evicts_and_answers_stay_correct(engine, params, greedy):
    batcher = started(engine, params, 4 * block_bytes(CONFIG, BLOCK) / 2**20)  # 4 blocks
    try:
        for prompt in EVICTED:
            assert run(batcher, prompt, 5) == expected(greedy, prompt, 5)
        cache = batcher.load()["prefix_cache"]
        assert cache["blocks"] == 4 and cache["blocks_used"] == 4 and cache["evicted"] == 8
        assert cache["prefill_tokens_saved"] == 2 * 4 * BLOCK
    finally:
        batcher.stop(timeout=60)


@pytest.mark.parametrize("flags, message", [
    (["--prefill-chunk", "8"], "--prefill-chunk must be at least 16, got 8"),
    (["--prefix-cache-mb", "-1"], "--prefix-cache-mb must be at least 0, got -1.0"),
])
def test_bad_prefill_flags_are_one_line(flags, message):
    with pytest.raises(ValueError, match=message):
        check_flags(parse_args(["--checkpoint", "unused", *flags]))


def test_a_prefix_cache_too_small_for_one_block_is_refused(engine, params):
    with pytest.raises(ValueError, match=r"--prefix-cache-mb 0.001 holds no block of 16 positions \(4096 bytes each"):
        Batcher(engine, engine.place_params(params), SLOTS, CONTEXT, [], prefix_cache_mb=0.001)


def test_on_fsdp_tp_chunked_and_prefix_cached_answers_equal_one_device(params, greedy):
    """8 emulated devices (fsdp 4 x tensor 2), slots of 256 positions, chunks of 32: the first
    prompt goes in 3 pieces, the second reuses its 4 blocks, and the prefix store is split like a
    cache."""
    engine = Engine(CONFIG, "fsdp_tp", prefill_chunk=32)
    batcher = Batcher(engine, engine.place_params(params), SLOTS, 256, [], steps_per_call=2, prefill_batch=SLOTS,
                      prefix_cache_mb=1)
    batcher.start()
    try:
        first, second = EVICTED[:2]
        recorders = [Recorder() for _ in range(2)]
        for prompt, recorder in zip((first, ids(12, 1)), recorders):
            batcher.submit(Request(prompt, 8, Sampling(), 0, recorder))
        assert all(r.done.wait(300) for r in recorders)
        assert [r.tokens for r in recorders] == [expected(greedy, p, 8) for p in (first, ids(12, 1))]
        computed = batcher.load()["prefill_tokens"]
        assert run(batcher, second, 8) == expected(greedy, second, 8)
        assert batcher.load()["prefill_tokens"] - computed == len(second) - 4 * BLOCK
        store = batcher.stager.store["k"]  # [layers, blocks, block, kv_heads, head_dim]
        assert store.sharding.shard_shape(store.shape) == (2, store.shape[1] // 4, BLOCK, 1, CONFIG.head_dim)
    finally:
        batcher.stop(timeout=60)
