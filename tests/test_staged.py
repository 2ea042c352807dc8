"""Prefill in pieces (`programs.extend`, `llama_jax.decoding.staged`): a prompt prefilled chunk by
chunk from any start, or from prefix blocks copied out of a store, gives one-shot prefill's
logits (float32 tolerance) and the same greedy decode after it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.decoding import programs, staged
from llama_jax.decoding.sampling import Sampling
from llama_jax.params import init_params, model_for
from tiny import LLAMA3_LIKE

CONFIG = LLAMA3_LIKE  # float32, GQA 8:2
CACHE_LEN = 128
BLOCK = 16
STEPS = 12
LENGTHS = (45, 70)  # two rows of different lengths
STOPS = jnp.asarray([-1], jnp.int32)


@pytest.fixture(scope="module")
def model_params():
    return model_for(CONFIG), init_params(CONFIG, jax.random.key(4))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(2)
    return [rng.integers(0, CONFIG.vocab_size, n).tolist() for n in LENGTHS]


def padded(prompts, t):
    out = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        out[i, :len(p)] = p
    return jnp.asarray(out)


@pytest.fixture(scope="module")
def jitted(model_params):
    """The programs under test, jitted once for the module."""
    model, _ = model_params
    return {"prefill": jax.jit(functools.partial(programs.prefill, model, sampling=Sampling(), cache_len=CACHE_LEN,
                                                 keep_logits=True)),
            "decode": jax.jit(functools.partial(programs.decode, model, sampling=Sampling(), steps=STEPS)),
            "extend": jax.jit(functools.partial(staged.extend_staged, model)),
            "first": jax.jit(functools.partial(first_tokens, model)),
            "begin": jax.jit(functools.partial(staged.begin, CONFIG, cache_len=CACHE_LEN)),
            "save": jax.jit(functools.partial(staged.save_blocks, block=BLOCK))}


@pytest.fixture(scope="module")
def one_shot(model_params, prompts, jitted):
    """(first-token logits [b, v], the greedy decode's tokens [b, STEPS]) of one-shot prefill."""
    _, params = model_params
    state, _, logits = jitted["prefill"](params, padded(prompts, 128), jnp.asarray(LENGTHS, jnp.int32),
                                         jnp.full((2,), 100, jnp.int32), jnp.int32(0), STOPS)
    return np.asarray(logits), np.asarray(jitted["decode"](params, state, STOPS)[1])


def first_tokens(model, params, staged_state):
    """One-shot prefill's (state, logits) from a staged state (greedy, limits 100)."""
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    keys = programs.seed_keys(jnp.int32(0), 2)
    state, _, logits = programs.first_tokens(model, params, staged_state["cache"], staged_state["last"], keys,
                                             lengths, jnp.full((2,), 100, jnp.int32), STOPS, Sampling())
    return state, logits


def in_pieces(jitted, params, staged_state, prompts, starts, sizes):
    """Extend each row from its own start, in pieces of `sizes` positions (the last ones past a
    row's end are padding)."""
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    offset = 0
    for size in sizes:
        tokens = np.zeros((2, size), np.int32)
        for i, (p, s) in enumerate(zip(prompts, starts)):
            piece = p[s + offset:s + offset + size]
            tokens[i, :len(piece)] = piece
        staged_state = jitted["extend"](params, staged_state, jnp.asarray(tokens),
                                        jnp.asarray(starts, jnp.int32) + offset, lengths)
        offset += size
    return staged_state


def answer(jitted, params, staged_state):
    """(first-token logits, greedy decode tokens) from a staged state."""
    state, logits = jitted["first"](params, staged_state)
    return np.asarray(logits), np.asarray(jitted["decode"](params, state, STOPS)[1])


NO_BLOCKS = np.full((2, CACHE_LEN // BLOCK), 1 << 20, np.int32)  # ids out of range: no block


@pytest.fixture(scope="module")
def pieced(model_params, prompts, jitted):
    """Both prompts prefilled from position 0 in uneven pieces of 16, 8, 16 and 32 positions."""
    _, params = model_params
    start = jitted["begin"](None, jnp.asarray(NO_BLOCKS))
    return in_pieces(jitted, params, start, prompts, (0, 0), (16, 8, 16, 32))


def test_a_prompt_prefilled_in_uneven_pieces_equals_one_shot(model_params, jitted, pieced, one_shot):
    logits, tokens = answer(jitted, model_params[1], pieced)
    np.testing.assert_allclose(logits, one_shot[0], atol=2e-5, rtol=1e-5)
    assert (logits.argmax(-1) == one_shot[0].argmax(-1)).all()
    np.testing.assert_array_equal(tokens, one_shot[1])


def test_rows_started_from_copied_prefix_blocks_equal_one_shot(model_params, prompts, jitted, pieced, one_shot):
    """Row 0's first 2 blocks and row 1's first 4 are saved into a store from the pieced prefill,
    then copied into a new staging state (in other block ids, the rest of the store garbage); only
    the rest of each prompt is computed."""
    params = model_params[1]
    m = CACHE_LEN // BLOCK
    store = jax.tree.map(lambda x: x + 7, staged.empty_store(CONFIG, 8, BLOCK))  # never written: never read
    ids = {0: [5, 2], 1: [0, 7, 3, 1]}
    table = NO_BLOCKS.copy()
    for row, row_ids in ids.items():
        dest = np.full((m,), 1 << 20, np.int32)  # out of range: not written
        dest[:len(row_ids)] = row_ids
        store = jitted["save"](store, pieced["cache"], row, jnp.arange(m, dtype=jnp.int32), jnp.asarray(dest))
        table[row, :len(row_ids)] = row_ids
    begun = jitted["begin"](store, jnp.asarray(table))
    # 45 - 32 = 13 and 70 - 64 = 6 positions left: pieces of 8 and 16.
    logits, tokens = answer(jitted, params, in_pieces(jitted, params, begun, prompts, (2 * BLOCK, 4 * BLOCK), (8, 16)))
    np.testing.assert_allclose(logits, one_shot[0], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(tokens, one_shot[1])
