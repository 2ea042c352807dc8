"""Quantised weights and KV caches: the rounding by hand, the error it costs in logits,
exact storage, QLoRA over a quantised base, and one-line refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import LLAMA3_LIKE, hf_model

from llama_jax import Llama, init_params
from llama_jax.formats.checkpoint import CheckpointError, restore_params, save_params
from llama_jax.formats.checkpoint_io import ParamsReader
from llama_jax.config import ConfigError, LoraConfig
from llama_jax.convert.quantize import quantize_checkpoint
from llama_jax.formats.hf import load_hf_params
from llama_jax.model.kv_cache import init_cache
from llama_jax.model.lora import split_adapters
from llama_jax.model.trees import join
from llama_jax.model.quantize import dequantize, quantize, quantize_kernel, require_fp8

# Four layers, so that fp8 (which leaves the first and last alone) quantises two.
CONFIG = LLAMA3_LIKE.replace(n_layers=4)
BF16 = CONFIG.replace(dtype="bfloat16", param_dtype="bfloat16")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    hf_model(CONFIG, seed=3).save_pretrained(directory)
    return directory


def _tokens(shape=(4, 64)):
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CONFIG.vocab_size, shape), jnp.int32)
    return tokens, jnp.broadcast_to(jnp.arange(shape[1]), shape)


def _logits(config, params, tokens, positions, cache=None):
    return jax.jit(Llama(config).apply)({"params": params}, tokens, positions, cache=cache)


def _kl(p_logits, q_logits) -> float:
    """Mean over positions of KL(p || q), from logits."""
    log_p, log_q = jax.nn.log_softmax(p_logits, -1), jax.nn.log_softmax(q_logits, -1)
    return float((jnp.exp(log_p) * (log_p - log_q)).sum(-1).mean())


# ---------------------------------------------------------------- the rounding, by hand

def test_int8_per_output_channel_by_hand():
    # kernel [in 3, out 2]: column 0's absmax is 0.5, column 1's is 1.0
    kernel = np.array([[0.5, -1.0], [0.3, 0.7], [-0.1, 0.2]], np.float32)
    values, scale = quantize_kernel(kernel, "int8", n_in=1)
    np.testing.assert_array_equal(scale, np.array([0.5 / 127, 1.0 / 127], np.float32))
    # 0.3 * 127 / 0.5 = 76.2 -> 76; -0.1 -> -25.4 -> -25; 0.7 * 127 = 88.9 -> 89; 0.2 -> 25.4 -> 25
    np.testing.assert_array_equal(values, np.array([[127, -127], [76, 89], [-25, 25]], np.int8))
    assert values.dtype == np.int8
    error = np.abs(np.asarray(dequantize(values, scale, (0,))) - kernel)
    assert (error <= np.asarray(scale) / 2 + 1e-9).all()  # half a step: 0.00197 and 0.00394
    assert error.max() > 0.0015  # 0.3 lands 0.00079 off, 0.7 0.0008 off, -0.1 0.0016 off


def test_fp8_e4m3_per_row_by_hand():
    # one output channel (our column; HF's row); absmax 3.5 gives scale 3.5 / 448 = 2^-7 exactly
    kernel = np.array([[1.0], [0.3], [-3.5], [0.00002]], np.float32)
    values, scale = quantize_kernel(kernel, "fp8", n_in=1)
    assert float(scale[0]) == 2.0 ** -7
    # x / scale = 128, 38.4, -448, 0.00256. e4m3 steps are 4 in [32, 64), so 38.4 -> 40;
    # 0.00256 is below the smallest normal (2^-6) and rounds to the subnormal 2^-9.
    np.testing.assert_array_equal(np.asarray(values, np.float32)[:, 0], [128.0, 40.0, -448.0, 2.0 ** -9])
    deq = np.asarray(dequantize(values, scale, (0,)))[:, 0]
    error = np.abs(deq - kernel[:, 0])
    normal = np.abs(kernel[:, 0]) / float(scale[0]) >= 2.0 ** -6
    assert (error[normal] <= 2.0 ** -4 * np.abs(kernel[normal, 0])).all()     # 0.3 -> 0.3125
    assert (error[~normal] <= 2.0 ** -10 * float(scale[0])).all()              # 2e-5 -> 2^-16


def test_fp8_activations_are_capped_at_1200_as_in_the_recipe():
    x = jnp.asarray([[3000.0, 600.0, -1.0]])
    values, scale = quantize(x, "fp8", (-1,), cap=1200.0)
    assert float(scale[0]) == pytest.approx(1200.0 / 448)
    np.testing.assert_allclose(np.asarray(dequantize(values, scale, (-1,)))[0], [1200.0, 600.0, -1.0], rtol=2 ** -4)


# ---------------------------------------------------------------- logits

@pytest.fixture(scope="module")
def bf16_logits(hf_dir):
    _, params = load_hf_params(hf_dir, BF16)
    return _logits(BF16, params, *_tokens())[0]


# KL(bf16 || quantised) per position on this model, measured: int8 6.4e-4, fp8 1.2e-3
# (bf16 against float32: 1.9e-4). Greedy choice under teacher forcing agrees with
# bf16's at 93% (int8) and 92% (fp8) of 256 positions (bf16 with float32's: 97%).
@pytest.mark.parametrize("kind, bound", [("int8", 2e-3), ("fp8", 4e-3)])
def test_quantised_logits_stay_within_a_kl_bound_of_bfloat16(hf_dir, bf16_logits, kind, bound):
    config, params = load_hf_params(hf_dir, BF16.replace(quantize=kind))
    kernels = params["layers"]["feed_forward"]["w1"]["kernel"]
    assert kernels.dtype == {"int8": np.int8, "fp8": jnp.float8_e4m3fn}[kind]
    assert ("layers_0" in params) == (kind == "fp8"), "fp8 keeps the first and last layers apart"
    logits = _logits(config, params, *_tokens())[0]
    kl = _kl(bf16_logits, logits)
    assert 1e-6 < kl < bound, kl
    agreement = float((logits.argmax(-1) == bf16_logits.argmax(-1)).mean())
    assert agreement >= 0.85, agreement


def test_fp8_leaves_attention_and_the_first_and_last_layers_in_bfloat16(hf_dir):
    _, params = load_hf_params(hf_dir, BF16.replace(quantize="fp8"))
    assert params["layers"]["feed_forward"]["w2"]["kernel"].shape[0] == 2  # layers 1 and 2
    assert params["layers"]["attention"]["wq"]["kernel"].dtype == jnp.bfloat16
    for edge in ("layers_0", "layers_3"):
        assert params[edge]["feed_forward"]["w1"]["kernel"].dtype == jnp.bfloat16
        assert "scale" not in params[edge]["feed_forward"]["w1"]


# KV cache: decoding token by token after a 16-token prefill, against one float32
# forward over the same 64 tokens. Measured: float cache 5e-6, int8 0.062 (rms 0.010,
# KL 5e-5), fp8 0.47 (rms 0.05, KL 1.2e-3); logits have rms 1.05.
@pytest.mark.parametrize("kind, max_error, max_kl", [(None, 1e-4, 1e-8), ("int8", 0.15, 2e-4), ("fp8", 1.0, 4e-3)])
def test_cached_logits_with_a_quantised_kv_cache_stay_close_to_a_float_forward(hf_dir, kind, max_error, max_kl):
    _, params = load_hf_params(hf_dir, CONFIG)
    tokens, positions = _tokens()
    full = _logits(CONFIG, params, tokens, positions)[0]
    config = CONFIG.replace(kv_cache_dtype=kind)
    cache = init_cache(config, 4, 64)
    if kind == "int8":
        assert cache["k"].dtype == jnp.int8 and cache["k_scale"].shape == (4, 4, 64, CONFIG.n_kv_heads)
    step = jax.jit(lambda cache, tokens, positions: Llama(config).apply(
        {"params": params}, tokens, positions, cache=cache), donate_argnums=0)
    out, cache = step(cache, tokens[:, :16], positions[:, :16])
    steps = [out]
    for i in range(16, 64):
        out, cache = step(cache, tokens[:, i:i + 1], positions[:, i:i + 1])
        steps.append(out)
    cached = jnp.concatenate(steps, axis=1)
    assert float(jnp.abs(cached - full).max()) < max_error
    assert _kl(full, cached) < max_kl


# ---------------------------------------------------------------- storage

def test_a_quantised_checkpoint_stores_and_loads_exact_bytes(hf_dir, tmp_path):
    config = quantize_checkpoint(hf_dir, tmp_path / "int8", "int8", show_progress=False)
    assert config.quantize == "int8" and config.param_dtype == "bfloat16"
    _, at_load = load_hf_params(hf_dir, config)
    stored = ParamsReader(tmp_path / "int8")
    for path in (("layers", "attention", "wo", "kernel"), ("layers", "attention", "wo", "scale"),
                 ("embed", "embedding")):
        leaf = at_load
        for key in path:
            leaf = leaf[key]
        on_disk = stored.read(path)
        assert on_disk.dtype == leaf.dtype and on_disk.tobytes() == leaf.tobytes(), path
    # and through orbax's own restore, and a save of what it restored
    restored_config, restored = restore_params(tmp_path / "int8")
    save_params(tmp_path / "again", restored_config, restored)
    _, again = restore_params(tmp_path / "again")
    for a, b in zip(jax.tree.leaves(at_load), jax.tree.leaves(again)):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_fp8_checkpoint_round_trips_with_its_split_layers(hf_dir, tmp_path):
    config = quantize_checkpoint(hf_dir, tmp_path / "fp8", "fp8", show_progress=False)
    _, at_load = load_hf_params(hf_dir, config)
    _, restored = restore_params(tmp_path / "fp8")
    assert set(restored) == {"embed", "norm", "output", "layers", "layers_0", "layers_3"}
    for a, b in zip(jax.tree.leaves(at_load), jax.tree.leaves(restored)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_a_quantised_checkpoint_refuses_a_config_that_disagrees(hf_dir, tmp_path):
    quantize_checkpoint(hf_dir, tmp_path / "q", "int8", show_progress=False)
    with pytest.raises(CheckpointError, match=r"config quantize is None but the checkpoint has 'int8'"):
        restore_params(tmp_path / "q", config=CONFIG)
    from infer.options import ServingOptions
    with pytest.raises(ConfigError, match=r"stored quantised as int8; it cannot be re-quantised as fp8"):
        ServingOptions(quantize="fp8").model_config(BF16.replace(quantize="int8"))


def test_fp8_where_jax_has_no_e4m3_type_is_one_line(monkeypatch):
    monkeypatch.delattr(jnp, "float8_e4m3fn")
    with pytest.raises(ConfigError, match=r"^fp8: jax \S+ has no float8_e4m3fn type; use int8 instead$"):
        require_fp8()


# ---------------------------------------------------------------- QLoRA

def test_int8_base_with_adapters_computes_the_base_plus_the_adapter_delta():
    """QLoRA through the same Linear: a frozen int8 base and float32 adapters compute what
    a float model with the dequantised kernels and the same adapters computes, and the
    adapters' gradients are the same too."""
    lora = LoraConfig(rank=4, alpha=8.0, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    float_config = LLAMA3_LIKE.replace(lora=lora)
    params = jax.tree_util.tree_map_with_path(  # trained adapters: B no longer zero
        lambda path, x: 0.05 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
        if path[-1].key == "lora_b" else x, init_params(float_config, jax.random.key(0)))
    adapters, base = split_adapters(params)
    int8_config = float_config.replace(quantize="int8")
    int8_base, dequantised = {**base, "layers": {}}, {**base, "layers": {}}
    for part, weights in base["layers"].items():
        if part not in ("attention", "feed_forward"):  # the norms
            int8_base["layers"][part] = dequantised["layers"][part] = weights
            continue
        int8_base["layers"][part], dequantised["layers"][part] = {}, {}
        for name, leaf in weights.items():
            n_in = 2 if name == "wo" else 1
            values, scale = quantize_kernel(leaf["kernel"], "int8", n_in, stacked=True)
            int8_base["layers"][part][name] = {"kernel": values, "scale": scale}
            dequantised["layers"][part][name] = {
                "kernel": dequantize(values, scale, tuple(range(1, 1 + n_in)))}
    tokens, positions = _tokens((2, 16))

    def loss(adapters, base, config):
        logits = Llama(config).apply({"params": join(base, adapters)}, tokens, positions)[0]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], -1).mean()

    want, want_grads = jax.jit(jax.value_and_grad(loss), static_argnums=2)(adapters, dequantised, float_config)
    got, got_grads = jax.jit(jax.value_and_grad(loss), static_argnums=2)(adapters, int8_base, int8_config)
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(np.abs(w).max()))
    # and the adapters do change the int8 model's output
    no_delta = loss(jax.tree.map(jnp.zeros_like, adapters), int8_base, int8_config)
    assert abs(float(no_delta) - float(got)) > 1e-3


def test_quantised_weights_and_cache_give_the_same_tokens_on_a_sharded_layout(hf_dir):
    """Kernels and scales are named with the logical axes of the weights they replace, so
    every layout shards them: fsdp_tp (fsdp 4 x tensor 2) decodes what one device does.
    Float32 compute, so that the comparison sees the sharding and not bfloat16's rounding
    of differently ordered sums (0.05 in these logits, enough to flip a greedy near-tie)."""
    from infer import generate

    config = CONFIG.replace(quantize="int8", kv_cache_dtype="int8")
    _, params = load_hf_params(hf_dir, config)
    prompts = [[5, 17, 33, 2], [9, 8, 7, 6, 5, 4, 3]]
    one = generate(params, None, prompts, max_new_tokens=12, config=config, return_logits=True)
    sharded = generate(params, None, prompts, max_new_tokens=12, config=config, layout="fsdp_tp",
                       return_logits=True)
    assert [g.tokens for g in sharded] == [g.tokens for g in one]
    for s, o in zip(sharded, one):
        np.testing.assert_allclose(s.logits, o.logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_on_cpu_a_narrow_weight_model_converts_one_layer_of_weights_at_a_time(quant):
    """XLA:CPU widens bfloat16 and int8 kernels to float32 for its matmuls; unless each conversion
    waits for its layer's input it schedules them all first (a float32 copy of the whole model:
    what made an 8B bfloat16 model ask for 30 GB). Prefill as infer compiles it on CPU."""
    import functools

    from llama_jax.decoding import programs
    from llama_jax.params import abstract_params, model_for
    from llama_jax.decoding.sampling import Sampling

    config = CONFIG.replace(dim=256, n_heads=4, n_kv_heads=2, ffn_dim=1024, n_layers=8, vocab_size=512,
                            dtype="bfloat16", param_dtype="bfloat16", scan_layers=False, quantize=quant)
    params = abstract_params(config)
    layer_f32 = 4 * sum(x.size for x in jax.tree.leaves(params["layers_0"]))
    whole_f32 = 4 * sum(x.size for x in jax.tree.leaves(params))
    ints = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    fill = functools.partial(programs.prefill, model_for(config), sampling=Sampling(), cache_len=64)
    compiled = jax.jit(fill).lower(params, ints((1, 32)), ints((1,)), ints((1,)), ints(()), ints((1,))).compile()
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    head_f32 = 4 * config.dim * config.vocab_size
    assert temporaries < 2 * layer_f32 + head_f32 + 2**20 < 0.5 * whole_f32, (temporaries, layer_f32, whole_f32)


@pytest.mark.parametrize("quant", [None, "int8"])
def test_on_cpu_the_decode_loop_converts_weights_inside_each_step(quant):
    """In a loop, XLA:CPU's invariant code motion lifted every float32 conversion out of the
    decode loop: 34 GB of temporaries for an 8B bfloat16 model. The decode loop as the Engine
    compiles it holds one layer's converted weights (and the head's) at a time."""
    import functools

    from infer.engine import Engine
    from llama_jax.decoding import programs
    from llama_jax.params import abstract_params
    from llama_jax.decoding.sampling import Sampling

    config = CONFIG.replace(dim=256, n_heads=4, n_kv_heads=2, ffn_dim=1024, n_layers=8, vocab_size=512,
                            dtype="bfloat16", param_dtype="bfloat16", quantize=quant)
    engine = Engine(config)
    params = abstract_params(engine.model_config)
    layer_f32 = 4 * sum(x.size for x in jax.tree.leaves(params["layers_0"]))
    whole_f32 = 4 * sum(x.size for x in jax.tree.leaves(params))
    state = jax.eval_shape(functools.partial(programs.empty_state, config, 1, 64))
    decode = jax.jit(functools.partial(programs.decode, engine.model, sampling=Sampling(), steps=4),
                     compiler_options=engine.compiler_options)
    compiled = decode.lower(params, state, jax.ShapeDtypeStruct((1,), jnp.int32)).compile()
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    head_f32 = 4 * config.dim * config.vocab_size
    assert temporaries < 2 * layer_f32 + head_f32 + 2**20 < 0.5 * whole_f32, (temporaries, layer_f32, whole_f32)
