"""Sampling functions on hand-made logits: greedy, temperature, top-k, top-p, keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.decoding.sampling import RowSampling, Sampling, filter_logits, greedy, row_keys, sample, top_p_mask

# Probabilities 0.5, 0.3, 0.15, 0.05, scrambled so sorting matters.
PROBS = np.array([0.15, 0.5, 0.05, 0.3])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]  # [1, 4]
BY_RANK = [1, 3, 0, 2]  # token ids from most to least likely


def draws(sampling, n=2000, logits=LOGITS, seed=0):
    """n independent draws (one per row key) from the same logits."""
    keys = row_keys(seed, n)
    return np.asarray(sample(jnp.broadcast_to(logits, (n, logits.shape[-1])), keys, sampling))


def test_greedy_takes_the_largest_logit_of_each_row():
    logits = jnp.asarray([[0.0, 3.0, 1.0], [5.0, -1.0, 4.9]])
    assert greedy(logits).tolist() == [1, 0]
    assert sample(logits, row_keys(0, 2), Sampling(temperature=0.0)).tolist() == [1, 0]


def test_top_k_one_is_greedy_at_any_temperature():
    logits = jax.random.normal(jax.random.key(1), (64, 50)) * 3
    for seed in range(3):
        tokens = sample(logits, row_keys(seed, 64), Sampling(temperature=2.0, top_k=1))
        np.testing.assert_array_equal(tokens, greedy(logits))


def test_top_k_draws_only_the_k_most_likely_tokens():
    seen = set(draws(Sampling(temperature=1.0, top_k=2)).tolist())
    assert seen == set(BY_RANK[:2])


def test_top_p_mask_keeps_the_smallest_prefix_reaching_p():
    sorted_logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    assert top_p_mask(sorted_logits, 0.45).tolist() == [[True, False, False, False]]
    assert top_p_mask(sorted_logits, 0.79).tolist() == [[True, True, False, False]]
    assert top_p_mask(sorted_logits, 0.81).tolist() == [[True, True, True, False]]
    assert top_p_mask(sorted_logits, 1.0).tolist() == [[True, True, True, True]]


def test_top_p_always_keeps_the_most_likely_token():
    assert set(draws(Sampling(temperature=1.0, top_p=1e-6), n=200).tolist()) == {BY_RANK[0]}


def test_top_p_draws_only_from_the_nucleus_in_proportion():
    tokens = draws(Sampling(temperature=1.0, top_p=0.81), n=4000)
    assert set(tokens.tolist()) == set(BY_RANK[:3])
    kept = PROBS[BY_RANK[:3]] / PROBS[BY_RANK[:3]].sum()
    freq = np.array([(tokens == t).mean() for t in BY_RANK[:3]])
    np.testing.assert_allclose(freq, kept, atol=0.03)


def test_top_p_applies_to_the_top_k_renormalised():
    # After top-k 3 the probabilities are 0.5, 0.3, 0.15 over 0.95: the third
    # starts at 0.842 > 0.83, so top-p drops it (unrenormalised it would start at 0.8).
    logits_bc, ids_bc = filter_logits(LOGITS, Sampling(temperature=1.0, top_k=3, top_p=0.83))
    kept = np.asarray(ids_bc)[np.isfinite(np.asarray(logits_bc))]
    assert kept.tolist() == BY_RANK[:2]


def test_temperature_one_samples_the_softmax_and_low_temperature_sharpens():
    tokens = draws(Sampling(temperature=1.0), n=4000)
    freq = np.array([(tokens == t).mean() for t in range(4)])
    np.testing.assert_allclose(freq, PROBS, atol=0.03)
    cold = draws(Sampling(temperature=0.05), n=500)
    assert (cold == BY_RANK[0]).all()


def test_a_key_reproduces_a_draw_and_other_keys_differ():
    logits = jnp.zeros((1, 1000))  # uniform: every draw is up to the key
    first = [int(sample(logits, row_keys(seed, 1), Sampling(1.0))[0]) for seed in range(5)]
    again = [int(sample(logits, row_keys(seed, 1), Sampling(1.0))[0]) for seed in range(5)]
    assert first == again
    assert len(set(first)) > 1


@pytest.mark.parametrize("settings", [dict(temperature=-1.0), dict(top_k=0), dict(top_k=1.5),
                                      dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_settings_are_rejected_with_a_message(settings):
    with pytest.raises(ValueError, match="temperature|top_k|top_p"):
        Sampling(**settings)


def test_settings_per_row_draw_what_each_row_s_own_settings_draw():
    # Rows: greedy, temperature only, top-k 2, top-p 0.6 (nucleus {1, 3}), top-k 3 then top-p 0.9.
    settings = [Sampling(), Sampling(0.7), Sampling(1.0, top_k=2), Sampling(1.0, top_p=0.6),
                Sampling(1.0, top_k=3, top_p=0.9)]
    n = 400
    logits = jnp.broadcast_to(LOGITS, (n * len(settings), 4))
    keys = row_keys(3, n * len(settings))
    rows = RowSampling.of([s for s in settings for _ in range(n)])
    got = np.asarray(sample(logits, keys, rows)).reshape(len(settings), n)
    assert set(got[0].tolist()) == {BY_RANK[0]}
    # Without filters the draw is the very one a shared Sampling makes with the same keys.
    np.testing.assert_array_equal(got[1], sample(logits[n:2 * n], keys[n:2 * n], settings[1]))
    assert set(got[2].tolist()) == set(BY_RANK[:2])
    assert set(got[3].tolist()) == set(BY_RANK[:2])
    assert set(got[4].tolist()) == set(BY_RANK[:3])
    np.testing.assert_allclose(np.mean(got[3] == BY_RANK[0]), 0.5 / 0.8, atol=0.06)
