"""Model behaviour: causality, packing, layer stacking, remat, dtypes, parameter counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import Llama, count_params, init_cache, init_params, load_model_config
from llama_jax.config import REMAT_POLICIES
from llama_jax.params import count_active_params
from llama_jax.model.trees import unstack_layers
from tiny import LLAMA3_LIKE, LLAMA31_LIKE

# Parameter counts from REFERENCE.md, in billions, to three significant figures.
PUBLISHED_BILLIONS = {
    "llama2_7b": 6.74, "llama2_13b": 13.0, "llama2_70b": 69.0, "llama3_8b": 8.03,
    "llama3_70b": 70.6, "llama3_1_8b": 8.03, "llama3_1_70b": 70.6, "llama3_1_405b": 406,
    "llama3_2_1b": 1.24, "llama3_2_3b": 3.21,
}


# Llama 4 text models (total, active per token), in billions: the published totals (Scout
# 109B, Maverick 400B) add the 0.87B image encoder, which tests/test_llama4.py adds.
LLAMA4_TEXT_BILLIONS = {"llama4_scout_17b_16e": (108, 17.2), "llama4_maverick_17b_128e": (401, 17.2)}


def _three_figures(x: float) -> float:
    return float(f"{x:.3g}")


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_parameter_count_matches_published(name):
    assert _three_figures(count_params(load_model_config(name)) / 1e9) == PUBLISHED_BILLIONS[name]


@pytest.mark.parametrize("name", sorted(LLAMA4_TEXT_BILLIONS))
def test_llama4_total_and_active_parameter_counts(name):
    config = load_model_config(name)
    counts = (count_params(config) / 1e9, count_active_params(config) / 1e9)
    assert tuple(map(_three_figures, counts)) == LLAMA4_TEXT_BILLIONS[name]


def _forward(config, params, tokens, positions=None, segment_ids=None):
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = jax.jit(Llama(config).apply)({"params": params}, tokens, positions, segment_ids)
    return logits


@pytest.fixture(scope="module")
def params31():
    return init_params(LLAMA31_LIKE, jax.random.key(1))


def _tokens(shape, seed=0, vocab=LLAMA31_LIKE.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, size=shape), jnp.int32)


def test_logits_at_t_ignore_tokens_after_t(params31):
    tokens = _tokens((2, 48))
    changed = tokens.at[:, 20:].set(_tokens((2, 28), seed=1))
    a, b = _forward(LLAMA31_LIKE, params31, tokens), _forward(LLAMA31_LIKE, params31, changed)
    np.testing.assert_array_equal(a[:, :20], b[:, :20])
    assert np.abs(a[:, 20:] - b[:, 20:]).max() > 1e-3


def test_causality_by_gradients(params31):
    """d logits[t] / d embedding row of the token at s is non-zero for every s <= t, zero for s > t.

    The 16 tokens are distinct, so each embedding row stands for one position.
    """
    tokens = jnp.asarray(np.random.default_rng(0).permutation(LLAMA31_LIKE.vocab_size)[:16][None],
                         jnp.int32)
    positions = jnp.arange(16)[None]

    def logits_at(t, embeddings):
        p = {**params31, "embed": {"embedding": embeddings}}
        return Llama(LLAMA31_LIKE).apply({"params": p}, tokens, positions)[0][0, t].sum()

    for t in (0, 7, 15):
        grad = jax.grad(logits_at, argnums=1)(t, params31["embed"]["embedding"])
        row_norms = np.abs(np.asarray(grad)).sum(-1)
        seen = row_norms[np.asarray(tokens[0, :t + 1])]
        unseen = row_norms[np.asarray(tokens[0, t + 1:])]
        assert (seen > 1e-6).all(), f"position {t}: no gradient from an earlier position ({seen.min():.2e})"
        assert (unseen == 0).all(), f"position {t}: gradient from a later position"


def test_packed_document_logits_equal_alone(params31):
    doc_a, doc_b = _tokens((1, 20), seed=2), _tokens((1, 28), seed=3)
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    positions = jnp.concatenate([jnp.arange(20), jnp.arange(28)])[None]
    segments = jnp.concatenate([jnp.full(20, 1), jnp.full(28, 2)])[None].astype(jnp.int32)
    together = _forward(LLAMA31_LIKE, params31, packed, positions, segments)
    alone_a = _forward(LLAMA31_LIKE, params31, doc_a)
    alone_b = _forward(LLAMA31_LIKE, params31, doc_b)
    np.testing.assert_allclose(together[:, :20], alone_a, atol=1e-5, rtol=0)
    np.testing.assert_allclose(together[:, 20:], alone_b, atol=1e-5, rtol=0)


def test_scanned_and_unrolled_stacks_agree(params31):
    tokens = _tokens((2, 32))
    scanned = _forward(LLAMA31_LIKE, params31, tokens)
    unrolled_config = LLAMA31_LIKE.replace(scan_layers=False)
    unrolled = _forward(unrolled_config, unstack_layers(params31, range(LLAMA31_LIKE.n_layers)), tokens)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=0)


def _loss_and_grads(config, params, tokens):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    def loss(p):
        logits, _ = Llama(config).apply({"params": p}, tokens, positions)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                             tokens[:, 1:, None], axis=-1))
    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
@pytest.mark.parametrize("scan", [True, False])
def test_every_remat_policy_gives_same_loss_and_gradients(params31, policy, scan):
    tokens = _tokens((2, 24))
    params = params31 if scan else unstack_layers(params31, range(LLAMA31_LIKE.n_layers))
    base = LLAMA31_LIKE.replace(scan_layers=scan)
    loss0, grads0 = _loss_and_grads(base, params, tokens)
    loss1, grads1 = _loss_and_grads(base.replace(remat=policy), params, tokens)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for g1, g0 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-7)


def test_hand_written_and_autodiff_swiglu_backward_give_the_same_gradients(params31):
    tokens = _tokens((2, 24))
    loss0, grads0 = _loss_and_grads(LLAMA31_LIKE.replace(swiglu_backward="manual"), params31, tokens)
    loss1, grads1 = _loss_and_grads(LLAMA31_LIKE.replace(swiglu_backward="autodiff"), params31, tokens)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for g1, g0 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-7)


def test_blocked_attention_equals_plain(params31):
    tokens = _tokens((2, 40))
    positions = jnp.asarray(np.concatenate([np.arange(15), np.arange(25)]))[None].repeat(2, 0)
    segments = jnp.asarray(np.concatenate([np.full(15, 1), np.full(25, 2)]))[None].repeat(2, 0)
    plain = _forward(LLAMA31_LIKE, params31, tokens, positions, segments)
    blocked = _forward(LLAMA31_LIKE.replace(attention="blocked", attention_block=16), params31,
                       tokens, positions, segments)
    np.testing.assert_allclose(blocked, plain, atol=1e-5, rtol=0)


def test_cached_prefill_equals_plain_forward(params31):
    tokens = _tokens((2, 32))
    positions = jnp.broadcast_to(jnp.arange(32), tokens.shape)
    plain = _forward(LLAMA31_LIKE, params31, tokens)
    cached, cache = Llama(LLAMA31_LIKE).apply({"params": params31}, tokens, positions,
                                               cache=init_cache(LLAMA31_LIKE, 2, 48))
    np.testing.assert_allclose(cached, plain, atol=1e-5, rtol=0)
    assert cache["k"].shape == (LLAMA31_LIKE.n_layers, 2, 48, LLAMA31_LIKE.n_kv_heads, LLAMA31_LIKE.head_dim)


def test_bfloat16_compute_stays_close_to_float32():
    """bf16 keeps 8 mantissa bits: each rounding errs by up to 2^-9 (0.2%), and the
    errors of a few hundred roundings per logit add up like a random walk. With
    weights scaled so activations are O(1) we allow an RMS error of 6% of the
    logits' spread (measured: 4%), and the top token must agree at >= 90% of
    positions (measured: 95%)."""
    params = init_params(LLAMA3_LIKE, jax.random.key(2))
    params = jax.tree.map(lambda x: x * 5 if x.ndim > 1 else x, params)
    tokens = _tokens((2, 64), vocab=LLAMA3_LIKE.vocab_size)
    f32 = _forward(LLAMA3_LIKE, params, tokens)
    bf16 = _forward(LLAMA3_LIKE.replace(dtype="bfloat16"), params, tokens)
    assert bf16.dtype == jnp.float32  # logits are float32 whatever the compute dtype
    spread = float(jnp.std(f32))
    assert spread > 0.5
    assert float(jnp.sqrt(jnp.mean((bf16 - f32) ** 2))) < 0.06 * spread
    assert float(jnp.mean(jnp.argmax(bf16, -1) == jnp.argmax(f32, -1))) >= 0.9


def test_unchecked_ids_inside_jit_behave_as_the_docstring_says(params31):
    """Inside jit ids are not checked: >= vocab gives NaN logits, -1 is the table's last row."""
    positions = jnp.arange(2)[None]
    apply = jax.jit(lambda tokens: Llama(LLAMA31_LIKE).apply({"params": params31}, tokens, positions)[0])
    vocab = LLAMA31_LIKE.vocab_size
    assert np.isnan(np.asarray(apply(jnp.asarray([[1, vocab]], jnp.int32)))[0, 1]).all()
    np.testing.assert_array_equal(apply(jnp.asarray([[1, -1]], jnp.int32)),
                                  apply(jnp.asarray([[1, vocab - 1]], jnp.int32)))


@pytest.mark.parametrize("bad", [-1, -256, 256])
def test_an_eager_apply_refuses_ids_outside_the_table(params31, bad):
    """Called from the host (no jit), the ids are known: a negative id, which the gather would
    count from the table's end, and an id past the table (256 rows) are one-line errors."""
    tokens = np.asarray([[1, bad]], np.int32)
    with pytest.raises(ValueError) as err:
        Llama(LLAMA31_LIKE).apply({"params": params31}, tokens, jnp.arange(2)[None])
    # (JAX appends a note on its filtered traceback below the first line; run_cli shows the first.)
    assert str(err.value).splitlines()[0] == f"tokens: token id {bad} is outside the model's vocabulary [0, 256)"


def test_host_check_names_the_first_id_outside_the_vocabulary():
    from llama_jax import check_token_ids

    check_token_ids([[0, 5], [9, 1]], 10)
    with pytest.raises(ValueError, match=r"^batch: token id 10 is outside the model's vocabulary \[0, 10\)$"):
        check_token_ids(np.asarray([[0, 10], [-1, 2]]), 10, "batch")


def test_one_seed_gives_the_same_weights_scanned_or_unrolled():
    key = jax.random.key(3)
    scanned = init_params(LLAMA3_LIKE, key)
    unrolled = init_params(LLAMA3_LIKE.replace(scan_layers=False), key)
    assert set(unrolled) == {"embed", "layers_0", "layers_1", "norm", "output"}
    jax.tree.map(np.testing.assert_array_equal, unrolled, unstack_layers(scanned, range(LLAMA3_LIKE.n_layers)))
