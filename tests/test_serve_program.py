"""One program per job: what `train.compile --serve` judges is what the server runs.

The batcher's compiled calls (infer.batcher, through Engine.slot_programs) and
train.compile's serve programs (train.compile.aot.serve_program), lowered for
the same flags on the 8 emulated CPU devices, are the same StableHLO text: the
same functions, static arguments, donation, shardings and shapes. A change of
shape changes the text, so the comparison can fail.
"""

import jax
import numpy as np
import pytest

from infer.batcher import Batcher
from infer.requests import Request
from infer.engine import Engine
from llama_jax.config import ModelConfig
from llama_jax.decoding.sampling import Sampling
from llama_jax.params import init_params
from sharding.layout import load_layout
from sharding.place import Placement
from train.compile.aot import serve_program

CONFIG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, vocab_size=256, max_seq_len=256)
LAYOUT = "fsdp_tp"  # batch over 4 fsdp shards, heads over 2 tensor shards
FLAGS = dict(slots=8, context=200, steps_per_call=2, prefill_batch=8)  # infer.serve's --max-batch ... flags


@pytest.fixture(scope="module")
def batcher():
    # Layers scanned, as the Engine runs them on TPU (train.compile's target).
    engine = Engine(CONFIG, LAYOUT, unroll_layers=False)
    params = engine.place_params(init_params(CONFIG, jax.random.key(0)))
    return Batcher(engine, params, FLAGS["slots"], FLAGS["context"], stop_ids=[1],
                   steps_per_call=FLAGS["steps_per_call"], prefill_batch=FLAGS["prefill_batch"])


def served(batcher, program, args) -> str:
    with batcher.engine.activate():
        return program.lower(*args).as_text()


def compiled_ahead(program: str, **changes) -> str:
    placement = Placement.create(CONFIG, load_layout(LAYOUT))
    step, args, _, _ = serve_program(CONFIG, placement, program, **{**FLAGS, **changes})
    with placement.activate():
        return step.lower(*args).as_text()


def test_the_servers_decode_call_is_the_program_train_compile_serve_judges(batcher):
    text = served(batcher, batcher.programs.decode, batcher.decode_args(np.zeros(FLAGS["slots"], bool)))
    assert "top_k" in text.lower() or "topk" in text.lower()  # each token's logprobs are part of it
    assert text == compiled_ahead("serve_decode")
    assert text != compiled_ahead("serve_decode", steps_per_call=3)
    assert text != compiled_ahead("serve_decode", context=100)  # 128 positions a slot, not 256


def test_the_servers_prefill_of_its_longest_prompts_is_the_program_train_compile_serve_judges(batcher):
    group = batcher.shape.prefill_rows[-1]
    longest = FLAGS["context"] - 1  # the longest prompt a request may have (one position to answer in)
    admitted = [(Request([5] * longest, 1, Sampling(), 0, lambda event: None), slot) for slot in range(group)]
    text = served(batcher, batcher.programs.prefill, batcher.prefill_args(admitted))
    assert text == compiled_ahead("serve_prefill")
    assert text != compiled_ahead("serve_prefill", prompt_len=16)
    assert text != compiled_ahead("serve_prefill", prefill_batch=4)
