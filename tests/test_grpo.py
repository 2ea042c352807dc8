"""GRPO: its arithmetic against NumPy, rollouts against the training forward pass, layouts,
a tiny run that learns, resume after SIGKILL, and bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.objectives.grpo import ADVANTAGE_EPS, grpo_sums, group_advantages
from train.objectives.policy_gradient import OLD_LOG_PROBS, kl_estimate, sampled_log_probs


def _numpy_grpo(policy, old, reference, rewards, weights, epsilon, beta, group):
    """The token-level GRPO loss written out independently, in float64."""
    r = rewards.reshape(-1, group).astype(np.float64)
    adv = ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + ADVANTAGE_EPS)).reshape(-1)
    total, count, kl_total, clipped = 0.0, 0.0, 0.0, 0.0
    for b in range(policy.shape[0]):
        for t in range(policy.shape[1]):
            if not weights[b, t]:
                continue
            ratio = np.exp(policy[b, t] - old[b, t])
            surrogate = min(ratio * adv[b], min(max(ratio, 1 - epsilon), 1 + epsilon) * adv[b])
            d = reference[b, t] - policy[b, t]
            kl = np.exp(d) - d - 1
            total += -surrogate + beta * kl
            kl_total += kl
            clipped += abs(ratio - 1) > epsilon
            count += 1
    return total / count, kl_total / count, clipped / count


def test_grpo_loss_equals_numpy_on_a_hand_made_batch():
    """Two prompts of three answers each, answers of uneven length (zero weights past the end):
    the loss, KL and clip fraction per answer token equal the loop above, in float64."""
    rng = np.random.default_rng(0)
    b, t, group = 6, 5, 3
    old = np.log(rng.uniform(0.05, 0.9, (b, t)))
    policy = old + rng.normal(0, 0.3, (b, t))  # some ratios beyond 1 +- 0.2, some inside
    reference = old + rng.normal(0, 0.2, (b, t))
    weights = (np.arange(t)[None, :] < np.array([5, 3, 1, 4, 2, 5])[:, None]).astype(np.float32)
    rewards = np.array([1.0, 0.0, 0.5, 2.0, 2.0, -1.0], np.float32)
    adv = np.asarray(group_advantages(jnp.asarray(rewards.reshape(-1, group)))).reshape(-1)
    value, sums = grpo_sums(*(jnp.asarray(x, jnp.float32) for x in (policy, old, reference)), jnp.asarray(adv),
                            jnp.asarray(weights), epsilon=0.2, beta=0.05, estimator="k3")
    loss, kl, clipped = _numpy_grpo(policy, old, reference, rewards, weights, 0.2, 0.05, group)
    n = float(sums["weight"])
    assert n == weights.sum() == 20
    assert 0 < clipped < 1, "the batch should hold clipped and unclipped tokens"
    assert float(value) == float(sums["loss"])
    np.testing.assert_allclose(float(sums["loss"]) / n, loss, rtol=1e-5)
    np.testing.assert_allclose(float(sums["kl"]) / n, kl, rtol=1e-5)
    np.testing.assert_allclose(float(sums["clip_fraction"]) / n, clipped, rtol=1e-6)


def test_a_group_of_equal_rewards_has_zero_advantages():
    rewards = jnp.asarray([[0.7, 0.7, 0.7, 0.7], [0.0, 1.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    adv = np.asarray(group_advantages(rewards))
    assert np.all(adv[0] == 0) and np.all(adv[2] == 0)
    np.testing.assert_allclose(adv[1], [-1, 1, -1, 1], rtol=1e-3)  # std 0.5: (r - 0.5) / 0.5


def test_kl_estimators_match_their_formulas():
    """k3 (Schulman): exp(r - p) - (r - p) - 1, never negative; k1: p - r; none: 0."""
    policy = np.array([-1.0, -2.5, -0.1, -3.0])
    reference = np.array([-1.2, -0.5, -0.1, -4.0])
    d = reference - policy
    got = {name: np.asarray(kl_estimate(jnp.asarray(policy), jnp.asarray(reference), name))
           for name in ("k3", "k1", "none")}
    np.testing.assert_allclose(got["k3"], np.exp(d) - d - 1, rtol=1e-6)
    assert np.all(got["k3"] >= 0) and got["k3"][2] == 0
    np.testing.assert_allclose(got["k1"], policy - reference, rtol=1e-6)
    assert np.all(got["none"] == 0)
    with pytest.raises(ValueError, match="grpo.kl: 'k2'"):
        kl_estimate(jnp.asarray(policy), jnp.asarray(reference), "k2")


# --- Rollouts: the sampler against the training forward pass, layouts, compiles. -----------------

from llama_jax import ModelConfig, init_params  # noqa: E402
from llama_jax.decoding.groups import sample_groups  # noqa: E402
from llama_jax.decoding.programs import NO_TOKEN  # noqa: E402
from llama_jax.model.llama import Llama  # noqa: E402
from train.rl.rollout import update_rows  # noqa: E402
from train_runs import REPO  # noqa: E402

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=560,
                     rope_theta=10000.0, max_seq_len=256)
STOPS = jnp.asarray([301, 308, 309], jnp.int32)  # the toy tokenizer's stop ids
TOY = REPO / "configs" / "data" / "toy"


def _prompts(lengths, t=12, seed=0):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), t), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(0, 300, n)
    return jnp.asarray(tokens), jnp.asarray(lengths, jnp.int32)


@pytest.fixture(scope="module")
def params():
    return jax.jit(init_params, static_argnums=0)(CONFIG, jax.random.key(0))


def test_sampler_log_probs_equal_the_training_forward_pass_in_float32(params):
    """Answers to prompts of uneven length, four per prompt from one prefill each: every answer
    token's log-probability as the sampler reported it equals the training forward pass's on
    the update row (left-padded prompt, answer, padding) to 1e-5; rows past an answer's end
    carry no weight, and a prompt's four answers differ (each row has its own key)."""
    prompts, lengths = _prompts([12, 5, 9])
    temperature = 0.7
    sample = jax.jit(functools.partial(sample_groups, Llama(CONFIG), group=4, temperature=temperature, steps=6,
                                       cache_len=128))
    tokens, log_probs, entropy, answer = sample(params, prompts, lengths, jax.random.key(3), STOPS)
    assert tokens.shape == (12, 6) and np.all(np.asarray(answer) == np.sum(np.asarray(tokens) != NO_TOKEN, 1))
    assert len({tuple(row) for row in np.asarray(tokens)[:4]}) > 1
    batch = update_rows(prompts, lengths, tokens, log_probs, 4)
    mine = np.asarray(jax.jit(functools.partial(sampled_log_probs, Llama(CONFIG), temperature=temperature))(
        params, batch))
    weights = np.asarray(batch["loss_weights"])
    assert weights.sum() == np.asarray(answer).sum()
    sampled = np.asarray(batch[OLD_LOG_PROBS])
    assert np.all(sampled[weights > 0] < 0) and np.all(np.asarray(entropy)[np.asarray(tokens) != NO_TOKEN] > 0)
    np.testing.assert_allclose(mine[weights > 0], sampled[weights > 0], rtol=0, atol=1e-5)


def _run(tmp_path, *overrides, config="grpo_tiny"):
    from train.config import load_run_config

    return load_run_config(config, [f"run_dir={tmp_path / 'run'}", "chip=v4", "data.global_batch=4",
                                    "grpo.group=4", *overrides])


def _rl_step(run, placement):
    from train.program import build_train_step
    from train.rl.build import build_rl_step, check_reward
    from llama_jax.text.tokenizer import load_tokenizer

    program = build_train_step(run, placement)
    return program, build_rl_step(run, placement, program.step, load_tokenizer(run.data.tokenizer), check_reward(run))


def _prompt_batch(run, placement):
    from train.data.pipeline import make_dataset

    data = make_dataset(run.data, shard_index=0, shard_count=1, model_vocab_size=run.model.vocab_size)
    return data, lambda: placement.global_batch(next(data))


def test_grpo_on_fsdp_tp_over_8_devices_equals_one_device(tmp_path, params):
    """A rollout and the GRPO gradients on it, from the same weights: on fsdp_tp over 8 devices
    (the policy and the KV cache split) the answers equal one device's, the sampler's and the
    reference's log-probabilities agree to 1e-5, and the objective's sums and gradients to 1e-5
    (relative)."""
    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.objectives.policy_gradient import ADVANTAGES
    from train.objectives.run import run_objective
    from train.rl.build import build_rl_step
    from train.step import make_gradients
    from llama_jax.text.tokenizer import load_tokenizer

    run = _run(tmp_path, "grpo.kl=k3", "grpo.beta=0.1", "grpo.reward=grpo_rewards:answer_length")
    reference = jax.tree.map(lambda x: x * 1.01, params)  # a KL term with a gradient
    objective = run_objective(run, None)
    results = {}
    for name, devices in (("one", jax.devices()[:1]), ("fsdp_tp", None)):
        placement = Placement.create(run.model, load_layout("fsdp_tp" if devices is None else "dp"), devices=devices)
        step = build_rl_step(run, placement, None, load_tokenizer(run.data.tokenizer), None)
        shardings = placement.param_shardings()
        placed, theirs = placement.put(params, shardings), placement.put(reference, shardings)
        _, prompts = _prompt_batch(run, placement)
        with placement.activate():
            prompts = prompts()
            batch, answers, stats = step.rollout(placed, {}, theirs, prompts, jnp.int32(0))
            index = np.repeat(np.asarray(prompts["index"]), run.grpo.group)
            rewards = step.reward(index, np.asarray(answers), batch)
            batch[ADVANTAGES] = jax.device_put(step.advantages(rewards.reshape(-1, run.grpo.group)).reshape(-1),
                                               placement.sharding("batch"))
            grads, sums = jax.jit(make_gradients(run.model, shardings, objective=objective))(
                placed, batch, None, theirs)
        if devices is None:
            assert placement.shards_along("embed") > 1 and placement.shards_along("heads") == 2
        results[name] = jax.device_get((answers, rewards, batch, stats, grads, sums))
    (answers, rewards, batch, stats, want_grads, want), (got_answers, got_rewards, got_batch, got_stats,
                                                          grads, sums) = results["one"], results["fsdp_tp"]
    np.testing.assert_array_equal(got_answers, answers)
    np.testing.assert_array_equal(got_rewards, rewards)
    assert 0 < rewards.std() and float(want["weight"]) > 0
    assert float(stats["log_prob_error"]) < 1e-5 and float(got_stats["log_prob_error"]) < 1e-5
    for key in ("old_log_probs", "reference_log_probs"):
        np.testing.assert_allclose(got_batch[key], batch[key], rtol=0, atol=1e-5, err_msg=key)
    for key in want:
        np.testing.assert_allclose(float(sums[key]), float(want[key]), rtol=1e-5, atol=1e-5, err_msg=key)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        err = float(np.abs(np.asarray(g) - w).max() / np.abs(w).max())
        assert err <= 1e-5, f"{jax.tree_util.keystr(path)} differs by {err:.2e} (relative)"


def test_rollout_and_update_compile_once_across_steps(tmp_path, params):
    """Three steps with LoRA (the reference: the base without adapters): the rollout and the
    update programs each hold one executable, whatever the answers' lengths and rewards."""
    from llama_jax.formats.checkpoint import save_params
    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.step import init_state

    base = params
    save_params(tmp_path / "base", CONFIG, base)
    run = _run(tmp_path, f"init_from={tmp_path / 'base'}", "lora={rank: 4, alpha: 8}",
               "model_overrides={vocab_size: 560, max_seq_len: 256, rope_scaling: null, rope_theta: 10000.0, "
               "dim: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, ffn_dim: 128}")
    placement = Placement.create(run.model, load_layout("dp"), devices=jax.devices()[:1])
    program, step = _rl_step(run, placement)
    frozen = placement.put(base, program.shardings.frozen)
    state, _ = init_state(placement, program.optimizer, jax.random.key(1), frozen)
    _, prompts = _prompt_batch(run, placement)
    lengths = set()
    with placement.activate():
        for _ in range(3):
            state, metrics = step(state, prompts())
            lengths.add(float(metrics["response_length"]))
    assert int(state.step) == 3 and float(metrics["kl"]) > 0
    assert step.rollout._cache_size() == 1 and program.step._cache_size() == 1, (
        step.rollout._cache_size(), program.step._cache_size())


# --- Bad input: one line, exit code 2. -------------------------------------------------------------

def _cli(tmp_path, capsys, *overrides):
    from train.__main__ import main

    group = [] if any(o.startswith("grpo.group=") for o in overrides) else ["grpo.group=2"]
    code = main(["--config", "grpo_tiny", "--quiet", f"run_dir={tmp_path / 'run'}", "chip=v4", "steps=1",
                 "data.global_batch=2", *group, *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and len(err) < 400, err
    return err


def test_a_group_of_one_is_one_line(tmp_path, capsys):
    err = _cli(tmp_path, capsys, "grpo.group=1")
    assert "grpo.group: 1 answers per prompt; a group needs at least 2" in err
    assert not (tmp_path / "run").exists()


def test_a_kl_weight_without_an_estimator_is_one_line(tmp_path, capsys):
    err = _cli(tmp_path, capsys, "grpo.kl=none", "grpo.beta=0.1")
    assert "grpo.beta: 0.1 weighs a KL penalty, but grpo.kl is none" in err
    assert not (tmp_path / "run").exists()


def test_a_reward_function_that_raises_names_itself_and_the_prompt(tmp_path, capsys):
    err = _cli(tmp_path, capsys, "grpo.reward=grpo_rewards:raises")
    assert "grpo.reward grpo_rewards:raises raised KeyError on prompt " in err
    assert "sum_prompts.jsonl:" in err and "no expected answer in this prompt" in err


def test_a_reward_function_returning_nan_is_one_line(tmp_path):
    from llama_jax.text.tokenizer import load_tokenizer
    from train.data.prompts import Prompts
    from train.rl.rewards import FunctionReward, RewardError

    tokenizer = load_tokenizer(TOY / "tokenizer.model")
    reward = FunctionReward("grpo_rewards:not_a_number", Prompts([str(TOY / "sum_prompts.jsonl")], tokenizer),
                            tokenizer)
    answers = np.array([[55, 309], [56, NO_TOKEN]])  # "7" then <|eot_id|>; "8"
    with pytest.raises(RewardError) as caught:
        reward(np.array([3, 4]), answers)
    assert str(caught.value) == ("grpo.reward grpo_rewards:not_a_number returned nan on prompt 3 "
                                 f"({TOY / 'sum_prompts.jsonl'}:4), sample row 0; a reward must be a finite number")
    ok = FunctionReward("train.rl.toy_rewards:sum_reward", reward.prompts, tokenizer)
    np.testing.assert_array_equal(ok(np.array([34, 34]), answers), [1.0, 0.0])  # line 35: "3 + 4 ="


def test_a_reward_model_with_another_vocabulary_is_one_line(tmp_path, capsys):
    from llama_jax.formats.checkpoint import save_params

    other = CONFIG.replace(vocab_size=512, head="score")
    save_params(tmp_path / "rm", other, jax.jit(init_params, static_argnums=0)(other, jax.random.key(0)))
    err = _cli(tmp_path, capsys, "grpo.reward=null", f"grpo.reward_model={tmp_path / 'rm'}")
    assert f"grpo.reward_model {tmp_path / 'rm'}: a vocabulary of 512 ids, the policy's has 560" in err
    assert not (tmp_path / "run").exists()


# --- Resume. -------------------------------------------------------------------------------------

GRPO_EXACT = ("loss", "kl", "clip_fraction", "ratio", "reward_mean", "reward_std", "response_length", "entropy",
              "tokens", "grad_norm", "learning_rate")


def test_a_killed_grpo_run_resumes_bit_exactly(tmp_path):
    """SIGKILL after step 3 (step 2 saved: policy, optimizer, prompt position; the samples' keys
    derive from the seed and the saved step), then the same command: every step's rewards, KL,
    loss and norms equal an uninterrupted run's, bit for bit."""
    from train_runs import cli, finish, kill_at_step, metrics, start, wait_for_step

    steps = ("steps=6", "log_every=1", "checkpoint_every=2", "data.global_batch=4", "grpo.group=4",
             "grpo.reward=tests.grpo_rewards:answer_length")  # rewards that differ from random weights
    cache = tmp_path / "cache"
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference = start(cli(reference_dir, *steps, config="grpo_tiny"), tmp_path / "reference.log", devices=1,
                      compilation_cache=cache)
    wait_for_step(reference_dir, 1, reference, timeout=240)
    killed = start(cli(killed_dir, *steps, config="grpo_tiny"), tmp_path / "killed.log", devices=1,
                   compilation_cache=cache)
    kill_at_step(killed_dir, 3, killed, saved=2)
    assert metrics(killed_dir)[-1]["step"] < 6
    resumed = start(cli(killed_dir, *steps, config="grpo_tiny"), tmp_path / "resumed.log", devices=1,
                    compilation_cache=cache)
    output = finish(resumed, tmp_path / "resumed.log", 240)
    assert resumed.returncode == 0, output
    assert "resuming from" in output
    assert finish(reference, tmp_path / "reference.log", 240) is not None and reference.returncode == 0

    def exact(run_dir):
        return [{k: row[k] for k in ("step", *GRPO_EXACT)} for row in metrics(run_dir)]

    want = exact(reference_dir)
    assert [row["step"] for row in want] == list(range(1, 7))
    assert len({row["reward_mean"] for row in want}) > 1
    assert exact(killed_dir) == want


# --- Learnability. -------------------------------------------------------------------------------

WORDS = ("apple", "candle", "cloud", "copper", "falcon", "forest", "garden", "lemon", "marble", "meadow")


def _held_out_accuracy(run_dir, config, prompts, held):
    """The share of right answers among 8 samples at temperature 1 (the policy GRPO trains) to
    each held-out prompt, from the checkpoint in `run_dir`."""
    from infer.generate import generate
    from llama_jax.formats.weights import load_params
    from llama_jax.text.chat import format_chat
    from llama_jax.text.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(TOY / "tokenizer.model")
    ids = [format_chat(tokenizer, [{"role": "user", "content": prompts[i]}]) for i in held] * 8
    outputs = generate(load_params(str(run_dir), config), tokenizer, ids, max_new_tokens=4, config=config,
                       temperature=1.0, seed=3)
    want = ["yes" if prompts[i].startswith("Agree") else "no" for i in held] * 8
    return np.mean([out.text.split()[:1] == [w] for out, w in zip(outputs, want)])


def test_grpo_raises_a_weak_sft_start_to_clearly_higher_held_out_accuracy(tmp_path):
    """"Agree: w1 w2" asks for "yes", "Disagree: w1 w2" for "no" (reward 1 for the right first
    word, tests/grpo_rewards.py `agrees`). 40 SFT steps give a weak start: the right format, but
    a third of its samples right on held-out prompts; 16 GRPO steps from that checkpoint
    (init_from) raise the held-out share by more than 0.25."""
    import itertools
    import json

    from train.config import load_run_config
    from train.data.config import DataConfig
    from train.data.pipeline import split_indices
    from train.loop import train

    rng = np.random.default_rng(0)
    prompts = [f"{'Agree' if rng.random() < 0.5 else 'Disagree'}: {a} {b}"
               for a, b in itertools.permutations(WORDS, 2)][:80]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "chat.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": p},
                                 {"role": "assistant", "content": "yes" if p.startswith("Agree") else "no"}]}) + "\n"
        for p in prompts))
    held = split_indices(len(prompts), DataConfig(source="prompts", paths=(str(tmp_path / "prompts.jsonl"),),
                                                  holdout=0.25, split="eval"))
    common = ["chip=v4", "layout=dp", "mesh={data: 1}", "data.holdout=0.25", "log_every=4"]
    sft = load_run_config("sft_sums_tiny", [f"run_dir={tmp_path / 'sft'}", "steps=40", "checkpoint_every=40",
                                            f"data.paths=[{tmp_path / 'chat.jsonl'}]", "optimizer.warmup_steps=3",
                                            *common])
    train(sft, progress=False)
    before = _held_out_accuracy(tmp_path / "sft", sft.model, prompts, held)
    grpo = load_run_config("grpo_tiny", [f"run_dir={tmp_path / 'grpo'}", "steps=16", "checkpoint_every=16",
                                         f"data.paths=[{tmp_path / 'prompts.jsonl'}]", "data.seq_len=48",
                                         "data.global_batch=8", f"init_from={tmp_path / 'sft'}",
                                         "grpo.reward=grpo_rewards:agrees", "optimizer.learning_rate=3e-3",
                                         *common])
    train(grpo, progress=False)
    after = _held_out_accuracy(tmp_path / "grpo", grpo.model, prompts, held)
    assert 0.1 < before < 0.6, before  # a weak start: the format, not yet the rule
    assert after > before + 0.25, (before, after)


def test_a_reward_model_scores_rollout_rows_as_it_scores_the_conversation_alone(tmp_path):
    """The update rows (left-padded prompt, answer, padding) scored by grpo.reward_model's
    ModelReward equal llama_jax.model.reward.conversation_rewards on each prompt + answer alone,
    right-padded from position 0 (as infer.score scores them), to 1e-5."""
    from llama_jax.formats.checkpoint import save_params
    from llama_jax.model.reward import conversation_rewards
    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.rl.rewards import ModelReward

    config = CONFIG.replace(head="score")
    scorer = jax.jit(init_params, static_argnums=0)(config, jax.random.key(7))
    scorer["score"]["kernel"] = scorer["score"]["kernel"] * 50  # rewards of order 1
    placement = Placement.create(config, load_layout("dp"), devices=jax.devices()[:1])
    save_params(tmp_path / "rm", config, scorer)
    reward = ModelReward(str(tmp_path / "rm"), config, placement)
    prompts, lengths = _prompts([12, 5, 9])
    answers = jnp.asarray([[7, 8, 309, NO_TOKEN], [9, NO_TOKEN, NO_TOKEN, NO_TOKEN], [1, 2, 3, 4]], jnp.int32)
    batch = update_rows(prompts, lengths, answers, jnp.zeros(answers.shape), 1)
    got = reward(None, None, batch)
    rows = [list(np.asarray(prompts[i, :int(lengths[i])])) + [int(x) for x in np.asarray(answers[i]) if x != NO_TOKEN]
            for i in range(3)]
    tokens = np.zeros((3, 16), np.int32)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row
    want = jax.jit(functools.partial(conversation_rewards, Llama(config)))(
        scorer, jnp.asarray(tokens), jnp.asarray([len(r) for r in rows], jnp.int32))
    assert np.abs(np.asarray(want)).max() > 0.1
    np.testing.assert_allclose(got, np.asarray(want), rtol=0, atol=1e-5)


def test_grpo_with_loss_chunk_equals_the_whole_logits(params):
    """loss_chunk 8 over rows of 18 positions (three strided chunks, the last padded): the sums
    and gradients equal the objective that makes every logit at once, to 1e-5."""
    from sharding.layout import load_layout
    from sharding.place import Placement
    from train.objectives.grpo import grpo
    from train.objectives.policy_gradient import ADVANTAGES, REFERENCE_LOG_PROBS
    from train.step import make_gradients

    rng = np.random.default_rng(1)
    prompts, lengths = _prompts([12, 5])
    answers = jnp.asarray([[7, 8, 309, NO_TOKEN, NO_TOKEN, NO_TOKEN], [9, 10, 11, 12, 13, 14],
                           [3, 309, NO_TOKEN, NO_TOKEN, NO_TOKEN, NO_TOKEN], [1, 2, 3, 4, 5, 309]], jnp.int32)
    batch = update_rows(prompts, lengths, answers, jnp.asarray(-rng.uniform(0.5, 3, (4, 6)), jnp.float32), 2)
    batch[REFERENCE_LOG_PROBS] = batch[OLD_LOG_PROBS] + jnp.asarray(rng.normal(0, 0.3, (4, 18)), jnp.float32)
    batch[ADVANTAGES] = jnp.asarray([1.0, -1.0, 0.5, -0.5], jnp.float32)
    placement = Placement.create(CONFIG, load_layout("dp"), devices=jax.devices()[:1])
    out = {}
    for chunk in (0, 8):
        objective = grpo(CONFIG, epsilon=0.2, beta=0.1, estimator="k3", temperature=0.8, chunk=chunk)
        with placement.activate():
            out[chunk] = jax.device_get(jax.jit(make_gradients(CONFIG, placement.param_shardings(),
                                                               objective=objective))(params, batch, None, None))
    (want_grads, want), (grads, sums) = out[0], out[8]
    assert float(want["weight"]) == 17 and float(want["loss"]) != 0  # answers of 3, 6, 2 and 6 tokens
    for key in want:
        np.testing.assert_allclose(float(sums[key]), float(want[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
        err = float(np.abs(np.asarray(g) - w).max() / np.abs(w).max())
        assert err <= 1e-5, f"{jax.tree_util.keystr(path)} differs by {err:.2e} (relative)"
