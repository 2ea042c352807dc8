"""Converters: Meta and HF weights in, HF out, streamed, with clear failures.

Meta's files are built here from a HF model by undoing HF's q/k permutation
and splitting by Meta's model-parallel rules, so agreeing with the HF weights
proves the permutation and the gathering.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from transformers import AutoTokenizer

from llama_jax import Llama, init_params
from llama_jax.formats.checkpoint import read_config, restore_params, save_params
from llama_jax.formats.checkpoint_io import ParamsReader
from llama_jax.config import RopeScaling
from llama_jax.cli import run_cli
from llama_jax.convert import hf_to_ours, meta_to_ours, ours_to_hf, quantize
from llama_jax.convert.hf_to_ours import convert_hf_to_ours
from llama_jax.convert.meta_to_ours import convert_meta_to_ours, published_rope_factor
from llama_jax.convert.ours_to_hf import export_hf
from llama_jax.formats.hf import load_hf_params
from llama_jax.formats.safetensors_io import SafetensorsCheckpoint
from llama_jax.text.tokenizer_training import train_bpe
from tiny import SHAPES, hf_model, write_random_hf

TOLERANCE = 1e-4  # max |logit difference|, float32
ROOT = Path(__file__).resolve().parent.parent


def our_logits(config, params, tokens):
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    logits, _ = jax.jit(Llama(config).apply)({"params": params}, tokens, positions)
    return np.asarray(logits)


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def tokens_for(config, length=64):
    return np.random.default_rng(0).integers(0, config.vocab_size, size=(2, length))


def assert_params_equal(expected, got):
    for keys, a in jax.tree_util.tree_flatten_with_path(expected)[0]:
        b = got
        for key in keys:
            b = b[key.key]
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(keys))


# ---------------------------------------------------------------- Meta files from a HF model

def meta_state_dict(model, config):
    """Meta's names and layouts (adjacent-pair rotary rows) for the weights of a HF model."""
    hf = model.state_dict()

    def unpermute(w, n):  # inverse of HF's [n, rows/n/2, 2, cols] -> swap(1, 2)
        rows, cols = w.shape
        return w.reshape(n, 2, rows // n // 2, cols).transpose(1, 2).reshape(rows, cols)

    state = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if not config.tie_embeddings:
        state["output.weight"] = hf["lm_head.weight"]
    for i in range(config.n_layers):
        p = f"model.layers.{i}."
        state.update({
            f"layers.{i}.attention.wq.weight": unpermute(hf[p + "self_attn.q_proj.weight"], config.n_heads),
            f"layers.{i}.attention.wk.weight": unpermute(hf[p + "self_attn.k_proj.weight"], config.n_kv_heads),
            f"layers.{i}.attention.wv.weight": hf[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": hf[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": hf[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": hf[p + "mlp.up_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": hf[p + "mlp.down_proj.weight"],
            f"layers.{i}.attention_norm.weight": hf[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": hf[p + "post_attention_layernorm.weight"],
        })
    assert not torch.equal(state["layers.0.attention.wq.weight"], hf["model.layers.0.self_attn.q_proj.weight"])
    return state


def shard_meta(state, config, n_shards, embedding_dim):
    """Split like Meta's model-parallel ranks; kv heads repeat when ranks outnumber them."""
    shards = [{} for _ in range(n_shards)]
    for name, w in state.items():
        if "norm" in name:
            pieces = [w] * n_shards
        elif name.endswith(("wk.weight", "wv.weight")) and n_shards > config.n_kv_heads:
            heads = w.reshape(config.n_kv_heads, config.head_dim, -1)
            pieces = [heads[s // (n_shards // config.n_kv_heads)] for s in range(n_shards)]
        elif name.startswith("tok_embeddings"):
            pieces = torch.chunk(w, n_shards, dim=embedding_dim)
        else:
            pieces = torch.chunk(w, n_shards, dim=1 if name.endswith(("wo.weight", "w2.weight")) else 0)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone().contiguous()  # a view would save the whole storage
    return shards


def write_meta(directory, model, config, n_shards, embedding_dim, vocab_in_params=True, **params_extra):
    directory.mkdir(parents=True)
    hidden = int(2 * 4 * config.dim / 3)
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size if vocab_in_params else -1,
              "multiple_of": config.ffn_dim, "ffn_dim_multiplier": config.ffn_dim / hidden,
              "norm_eps": config.norm_eps, "rope_theta": config.rope_theta, **params_extra}
    (directory / "params.json").write_text(json.dumps(params))
    for s, shard in enumerate(shard_meta(meta_state_dict(model, config), config, n_shards, embedding_dim)):
        torch.save(shard, directory / f"consolidated.{s:02d}.pth")


META_CASES = {
    # Llama 3: tok_embeddings split on the vocabulary; vocab from params.json.
    "llama3_two_shards": ("llama3", 2, 0, {}),
    # Llama 2: tok_embeddings split on dim; params.json says vocab -1.
    "llama2_embedding_on_dim1": ("llama2", 2, 1, {"vocab_size": SHAPES["llama2"].vocab_size}),
    # More ranks than kv heads (like 405B MP16), tied embeddings, llama3 rope scaling.
    "llama3_2_ranks_outnumber_kv_heads": ("llama3_2", 2, 0, {"rope_scaling": json.dumps(
        {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_context": 64})}),
    "llama3_1_four_ranks_two_kv_heads": ("llama3_1", 4, 0, {"rope_scaling": json.dumps(
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64})}),
}


@pytest.mark.parametrize("case", sorted(META_CASES))
def test_meta_shards_convert_to_the_hf_weights_and_logits(case, tmp_path):
    shape, n_shards, embedding_dim, flags = META_CASES[case]
    config = SHAPES[shape]
    model = hf_model(config)
    write_meta(tmp_path / "meta", model, config, n_shards, embedding_dim,
               vocab_in_params="vocab_size" not in flags)
    converted = convert_meta_to_ours(tmp_path / "meta", tmp_path / "ours", dtype="float32",
                                     max_seq_len=config.max_seq_len, show_progress=False, **flags)
    assert converted == config.replace(param_dtype="float32")

    model.save_pretrained(tmp_path / "hf")
    _, hf_params = load_hf_params(tmp_path / "hf")
    restored_config, params = restore_params(tmp_path / "ours")
    assert_params_equal(hf_params, params)
    tokens = tokens_for(config)
    expected = torch_logits(model, tokens)
    np.testing.assert_allclose(our_logits(restored_config, params, tokens), expected, rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("shape", ["llama3_1", "llama3_2"])
def test_hf_in_and_out_loads_in_transformers_with_equal_logits(shape, tmp_path):
    config = SHAPES[shape]
    hf_model(config).save_pretrained(tmp_path / "hf_in")
    convert_hf_to_ours(tmp_path / "hf_in", tmp_path / "ours", dtype="float32", show_progress=False)
    _, hf_params = load_hf_params(tmp_path / "hf_in")
    restored_config, params = restore_params(tmp_path / "ours")
    assert_params_equal(hf_params, params)
    assert ParamsReader(tmp_path / "ours").layers_per_chunk(("layers", "feed_forward", "w2", "kernel")) == 1

    # No tokenizer here, and hf_in declares no special ids: the export is told them.
    export_hf(tmp_path / "ours", tmp_path / "hf_out", dtype="float32", max_shard_bytes=200_000, show_progress=False,
              bos_token_id=1, eos_token_id=2)
    out = tmp_path / "hf_out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected several safetensors files"
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["rope_theta"] == config.rope_theta and hf_config["rope_parameters"]["rope_type"] == "llama3"
    assert hf_config["rope_scaling"]["factor"] == config.rope_scaling.factor
    assert (out / "generation_config.json").is_file()

    model = transformers.LlamaForCausalLM.from_pretrained(out).eval()  # no code of ours involved
    tokens = tokens_for(config)
    expected = our_logits(restored_config, params, tokens)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(torch_logits(model, tokens), expected, rtol=0, atol=TOLERANCE)


@pytest.fixture(scope="module")
def byte_tokenizer_dir(tmp_path_factory):
    """A Llama-3-style tokenizer of the 256 byte tokens: ids 0..255, specials 256..511."""
    directory = tmp_path_factory.mktemp("tok")
    train_bpe(["no merges needed"], 256, directory / "tokenizer.model")
    return directory


def forced_token_params(config, token):
    """Weights under which the model predicts `token` after any input: attention and FFN
    add nothing, every embedding is e_0, and only `token`'s output column reads e_0."""
    params = jax.tree.map(np.array, init_params(config, jax.random.key(0)))  # writable copies
    params["embed"]["embedding"][:] = 0
    params["embed"]["embedding"][:, 0] = 1
    params["layers"]["attention"]["wo"]["kernel"][:] = 0
    params["layers"]["feed_forward"]["w2"]["kernel"][:] = 0
    params["norm"]["scale"][:] = 1
    params["output"]["kernel"][:] = 0
    params["output"]["kernel"][0, token] = 1
    return params


@pytest.mark.parametrize("stop", ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"])
def test_hf_export_names_the_tokenizer_stop_ids_and_generate_stops_there(byte_tokenizer_dir, tmp_path, stop):
    config = SHAPES["llama3"].replace(vocab_size=512)  # 256 byte ranks + 256 specials
    stop_id = {"<|end_of_text|>": 257, "<|eom_id|>": 264, "<|eot_id|>": 265}[stop]  # Meta's offsets 1, 8, 9
    save_params(tmp_path / "ours", config, forced_token_params(config, stop_id))
    export_hf(tmp_path / "ours", tmp_path / "hf", dtype="float32", tokenizer=byte_tokenizer_dir, show_progress=False)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (hf_config["bos_token_id"], hf_config["eos_token_id"]) == (256, 257)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (256, [257, 264, 265])
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == (byte_tokenizer_dir / "tokenizer.model").read_bytes()

    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    prompt = torch.tensor([[256, 72, 105]])  # <|begin_of_text|>Hi
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=257)
    assert out[0].tolist() == [256, 72, 105, stop_id]


def test_hf_export_refuses_a_tokenizer_larger_than_the_vocabulary(byte_tokenizer_dir, tmp_path, capsys):
    save_params(tmp_path / "ours", SHAPES["llama3"], init_params(SHAPES["llama3"], jax.random.key(0)))
    run_and_expect_error(ours_to_hf.main, [str(tmp_path / "ours"), str(tmp_path / "out"), "--tokenizer",
                                           str(byte_tokenizer_dir)], capsys, tmp_path / "out",
                         "the tokenizer has 512 ids but the model's vocabulary is 320")


LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tmp_path_factory):
    """A Hugging Face Llama 3 style tokenizer saved by transformers: tokenizer.json,
    tokenizer_config.json and the chat template in chat_template.jinja."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from llama_jax.text.tokenizer import llama3_special_tokens

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the llama is a camelid"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.add_special_tokens(llama3_special_tokens())
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                                eos_token="<|eot_id|>")
    fast.chat_template = LLAMA3_TEMPLATE
    directory = tmp_path_factory.mktemp("chat_tok")
    fast.save_pretrained(directory)
    assert (directory / "chat_template.jinja").is_file()
    return directory


CHAT_MESSAGES = [{"role": "user", "content": "the llama"}]


def test_hf_export_keeps_every_tokenizer_file_so_the_chat_template_applies(chat_tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    config = SHAPES["llama3"].replace(vocab_size=len(tokenizer))
    save_params(tmp_path / "ours", config, init_params(config, jax.random.key(0)))
    export_hf(tmp_path / "ours", tmp_path / "hf", dtype="float32", tokenizer=chat_tokenizer_dir, show_progress=False)
    for name in os.listdir(chat_tokenizer_dir):
        assert (tmp_path / "hf" / name).read_bytes() == (chat_tokenizer_dir / name).read_bytes(), name
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert exported.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert eot in generation.eos_token_id


def test_hf_export_takes_the_tokenizer_beside_the_checkpoint_or_refuses_without_one(chat_tokenizer_dir, tmp_path,
                                                                                  capsys):
    config = SHAPES["llama3"].replace(vocab_size=len(AutoTokenizer.from_pretrained(chat_tokenizer_dir)))
    run = tmp_path / "run"
    save_params(run / "ours", config, init_params(config, jax.random.key(0)))
    # No tokenizer anywhere and a vocabulary of neither Llama's size: no stop ids to write.
    run_and_expect_error(ours_to_hf.main, [str(run / "ours"), str(tmp_path / "out")], capsys, tmp_path / "out",
                         "pass --tokenizer")
    # A tokenizer saved with the run (beside its checkpoint) is the checkpoint's own.
    for name in os.listdir(chat_tokenizer_dir):
        (run / name).write_bytes((chat_tokenizer_dir / name).read_bytes())
    export_hf(run / "ours", tmp_path / "out", dtype="float32", show_progress=False)
    exported = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert exported.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert exported.convert_tokens_to_ids("<|eot_id|>") in generation["eos_token_id"]


def test_bfloat16_export_holds_our_weights_rounded(tmp_path):
    config = SHAPES["llama3"]
    _, params = load_hf_params(_saved_hf(config, tmp_path), dtype=np.float32)
    save_params(tmp_path / "ours", config, params)
    export_hf(tmp_path / "ours", tmp_path / "out", dtype="bfloat16", show_progress=False, bos_token_id=1,
              eos_token_id=2)  # no tokenizer here: the ids are given
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    q = model.state_dict()["model.layers.1.self_attn.q_proj.weight"]
    assert q.dtype == torch.bfloat16
    ours = np.asarray(params["layers"]["attention"]["wq"]["kernel"][1]).reshape(config.dim, -1).T
    np.testing.assert_array_equal(q.float().numpy(), torch.tensor(ours).to(torch.bfloat16).float().numpy())


def _saved_hf(config, tmp_path):
    hf_model(config).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


# ---------------------------------------------------------------- memory

# Baseline: the resident size after a warm-up conversion (imports, JAX and tensorstore
# set-up); peak: VmHWM after converting the big checkpoint. VmHWM rather than
# ru_maxrss: Linux carries the pre-exec high-water mark into ru_maxrss, so a
# child forked from a large pytest process would report the parent's size.
MEMORY_CHILD = """
import json, re, sys
from pathlib import Path
from llama_jax.convert.hf_to_ours import main
status = lambda field: int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
dtype = ["--dtype", sys.argv[5], "--no-progress"]
main([sys.argv[1], sys.argv[2]] + dtype)
baseline = status("VmRSS")
main([sys.argv[3], sys.argv[4]] + dtype)
print(json.dumps({"baseline_kb": baseline, "peak_kb": status("VmHWM")}))
"""


@pytest.fixture(scope="module")
def random_hf(tmp_path_factory):
    """About 350 MB of float32 random weights; the embedding and the head (125 MiB each) are the
    largest tensors, with the head converted right after the embedding, as in a real checkpoint."""
    config = SHAPES["llama3"].replace(dim=1024, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=2816, vocab_size=32000)
    directory = tmp_path_factory.mktemp("random") / "hf"
    total, largest = write_random_hf(directory, config)
    small = directory.parent / "small"
    hf_model(SHAPES["llama3"]).save_pretrained(small)
    return directory, small, total, largest


# Before the fix this grew 2.4x (bfloat16) and 3.9x (float32) the largest tensor: tensorstore
# copied each tensor, the freed zstd buffer of the embedding stayed resident while the head
# was read, and the source's memory-mapped pages counted on top of its copy.
@pytest.mark.parametrize("dtype, bound", [("bfloat16", 1.75), ("float32", 2.25)])
def test_hf_conversion_memory_stays_within_about_twice_the_largest_tensor(random_hf, tmp_path, dtype, bound):
    directory, small, total, largest = random_hf
    run = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(small), str(tmp_path / "small_out"),
                          str(directory), str(tmp_path / "out"), dtype],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={"PATH": os.environ.get("PATH", ""), "JAX_PLATFORMS": "cpu"})  # not what tests set
    assert run.returncode == 0, run.stderr[-2000:]
    usage = json.loads(run.stdout.strip().splitlines()[-1])
    grown = (usage["peak_kb"] - usage["baseline_kb"]) * 1024
    print(f"{dtype}: checkpoint {total / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB, "
          f"baseline {usage['baseline_kb'] / 2**10:.0f} MiB, growth {grown / 2**20:.0f} MiB ({grown / largest:.2f}x)")
    # Reading: the source tensor and its converted copy; writing: ours and tensorstore's zstd output.
    assert grown < bound * largest, f"peak grew {grown / 2**20:.0f} MiB for a {largest / 2**20:.0f} MiB tensor"
    stored = ParamsReader(tmp_path / "out").read(("output", "kernel"))
    expected = SafetensorsCheckpoint(directory).get("lm_head.weight").T.astype(stored.dtype)
    np.testing.assert_array_equal(stored, expected)


LOAD_CHILD = """
import json, re, sys
from pathlib import Path
import jax
from infer.generate import load_model
status = lambda field: int(re.search(field + r":\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
load_model(sys.argv[1], tokenizer=sys.argv[3])
baseline = status("VmRSS")
config, params, _ = load_model(sys.argv[2], tokenizer=sys.argv[3])
print(json.dumps({"baseline_kb": baseline, "peak_kb": status("VmHWM"), "dtype": config.param_dtype,
                  "params_bytes": sum(x.nbytes for x in jax.tree.leaves(params))}))
"""


def test_loading_a_bfloat16_hf_directory_holds_one_tensor_beyond_the_model(byte_tokenizer_dir, tmp_path):
    """load_model reads a 2 GB bfloat16 directory tensor by tensor into bfloat16 arrays on
    the device (host memory on CPU): the peak above the baseline is the loaded model plus
    less than one largest tensor (0.53 GB here, the embedding and the head). Before, the
    whole model was first built in float32 on the host (2x the model), then placed."""
    config = SHAPES["llama3"].replace(dim=2048, n_layers=8, n_heads=16, n_kv_heads=4, ffn_dim=8192,
                                      vocab_size=128256 + 2048)
    total, largest = write_random_hf(tmp_path / "big", config, "bfloat16")
    small = tmp_path / "small"
    hf_model(SHAPES["llama3"]).to(torch.bfloat16).save_pretrained(small)
    run = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(small), str(tmp_path / "big"), str(byte_tokenizer_dir)],
                         capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={"PATH": os.environ.get("PATH", ""), "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0, run.stderr[-2000:]
    usage = json.loads(run.stdout.strip().splitlines()[-1])
    grown = (usage["peak_kb"] - usage["baseline_kb"]) * 1024
    assert usage["dtype"] == "bfloat16" and usage["params_bytes"] == total
    print(f"checkpoint {total / 2**30:.2f} GiB, largest tensor {largest / 2**20:.0f} MiB, growth "
          f"{grown / 2**30:.2f} GiB = model + {(grown - total) / largest:.2f}x the largest tensor")
    assert grown < total + largest, f"peak grew {grown / 2**20:.0f} MiB for a {total / 2**20:.0f} MiB model"


# ---------------------------------------------------------------- bad input

def run_and_expect_error(main, argv, capsys, output: Path, fragment: str):
    capsys.readouterr()  # drop what building the input printed
    code = run_cli(main, argv + ["--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err
    assert not output.exists()
    assert not [p for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")], "staging left behind"


@pytest.fixture(scope="module")
def llama3_meta(tmp_path_factory):
    directory = tmp_path_factory.mktemp("meta") / "meta"
    write_meta(directory, hf_model(SHAPES["llama3"]), SHAPES["llama3"], 2, 0)
    return directory


def copy_meta(source, target, skip=()):
    target.mkdir()
    for path in source.iterdir():
        if path.name not in skip:
            (target / path.name).write_bytes(path.read_bytes())
    return target


def test_meta_without_params_json_fails_in_one_line(llama3_meta, tmp_path, capsys):
    meta = copy_meta(llama3_meta, tmp_path / "meta", skip={"params.json"})
    run_and_expect_error(meta_to_ours.main, [str(meta), str(tmp_path / "out")], capsys, tmp_path / "out",
                         "params.json: file not found")


def test_meta_missing_shard_fails_in_one_line(llama3_meta, tmp_path, capsys):
    last_missing = copy_meta(llama3_meta, tmp_path / "last", skip={"consolidated.01.pth"})
    run_and_expect_error(meta_to_ours.main, [str(last_missing), str(tmp_path / "out")], capsys, tmp_path / "out",
                         "expected 2 shards consolidated.00..01.pth (shard 0 holds 32 of wq's 64 rows), found 1")
    gap = copy_meta(llama3_meta, tmp_path / "gap")
    (gap / "consolidated.01.pth").rename(gap / "consolidated.02.pth")
    run_and_expect_error(meta_to_ours.main, [str(gap), str(tmp_path / "out")], capsys, tmp_path / "out",
                         "consolidated.01.pth: shard missing")


def with_params(meta, **changes):
    params = json.loads((meta / "params.json").read_text())
    (meta / "params.json").write_text(json.dumps({**params, **changes}))
    return meta


def test_meta_scaled_rope_without_factor_on_an_unpublished_size_is_refused(llama3_meta, tmp_path, capsys):
    meta = with_params(copy_meta(llama3_meta, tmp_path / "meta"), use_scaled_rope=True)
    run_and_expect_error(meta_to_ours.main, [str(meta), str(tmp_path / "out")], capsys, tmp_path / "out",
                         "is no published Llama 3.1/3.2 size; pass --rope-scaling FACTOR")


@pytest.mark.parametrize("params_factor, flag, expected", [(32.0, None, 32.0), (32.0, "16", 16.0), (None, "4", 4.0)])
def test_meta_rope_factor_from_params_json_or_the_flag(llama3_meta, tmp_path, capsys, params_factor, flag, expected):
    extra = {} if params_factor is None else {"rope_scaling_factor": params_factor}
    meta = with_params(copy_meta(llama3_meta, tmp_path / "meta"), use_scaled_rope=True, **extra)
    config = convert_meta_to_ours(meta, tmp_path / "out", rope_scaling=flag, show_progress=False)
    assert config.rope_scaling == RopeScaling(factor=expected)
    assert read_config(tmp_path / "out").rope_scaling.factor == expected
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("shape, factor", [
    ((4096, 32, 32, 8, 128256), 8.0),     # Llama 3.1 8B
    ((8192, 80, 64, 8, 128256), 8.0),     # Llama 3.1 70B
    ((16384, 126, 128, 8, 128256), 8.0),  # Llama 3.1 405B
    ((2048, 16, 32, 8, 128256), 32.0),    # Llama 3.2 1B
    ((3072, 28, 24, 8, 128256), 32.0),    # Llama 3.2 3B
    ((3072, 28, 24, 8, 128000), None),    # 3.2 3B without the 256 special tokens
    ((2048, 16, 32, 4, 128256), None),    # 3.2 1B with other kv heads
    ((64, 2, 4, 2, 256), None),           # configs/models/tiny.yaml: not Meta's rope parameters
])
def test_published_llama3_sizes_give_their_rope_factor(shape, factor):
    assert published_rope_factor(*shape) == factor


def test_meta_tensor_of_wrong_shape_fails_after_partial_writes(llama3_meta, tmp_path, capsys):
    meta = copy_meta(llama3_meta, tmp_path / "meta")
    shard = torch.load(meta / "consolidated.01.pth", weights_only=True)
    shard["layers.1.feed_forward.w2.weight"] = shard["layers.1.feed_forward.w2.weight"][:, :-8].clone()
    torch.save(shard, meta / "consolidated.01.pth")
    run_and_expect_error(meta_to_ours.main, [str(meta), str(tmp_path / "out")], capsys, tmp_path / "out",
                         "layers.1.feed_forward.w2.weight")


def test_hf_tensor_of_wrong_shape_fails_in_one_line(tmp_path, capsys):
    from safetensors.torch import save_file

    config = SHAPES["llama3"]
    hf_dir = _saved_hf(config, tmp_path)
    state = {k: v.contiguous() for k, v in hf_model(config).state_dict().items()}
    state["model.layers.1.mlp.down_proj.weight"] = state["model.layers.1.mlp.down_proj.weight"][:, :-8].contiguous()
    save_file(state, hf_dir / "model.safetensors", metadata={"format": "pt"})
    run_and_expect_error(hf_to_ours.main, [str(hf_dir), str(tmp_path / "out")], capsys, tmp_path / "out",
                         "model.layers.1.mlp.down_proj.weight has shape")


def test_truncated_safetensors_fails_in_one_line(tmp_path, capsys):
    hf_dir = _saved_hf(SHAPES["llama3"], tmp_path)
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) - 1000])
    run_and_expect_error(hf_to_ours.main, [str(hf_dir), str(tmp_path / "out")], capsys, tmp_path / "out",
                         "truncated safetensors file")


def test_quantising_with_an_unknown_kind_or_twice_fails_in_one_line(tmp_path, capsys):
    hf_dir = _saved_hf(SHAPES["llama3"], tmp_path)
    run_and_expect_error(quantize.main, [str(hf_dir), str(tmp_path / "out"), "--quantize", "int4"], capsys,
                         tmp_path / "out", "--quantize: unknown 'int4' (known: int8, fp8)")
    quantize.quantize_checkpoint(hf_dir, tmp_path / "int8", "int8", show_progress=False)
    run_and_expect_error(quantize.main, [str(tmp_path / "int8"), str(tmp_path / "out"), "--quantize", "fp8"],
                         capsys, tmp_path / "out", "already quantised (int8)")
    run_and_expect_error(ours_to_hf.main, [str(tmp_path / "int8"), str(tmp_path / "out")], capsys,
                         tmp_path / "out", "its weights are stored quantised (int8)")


def test_export_of_a_missing_checkpoint_fails_in_one_line(tmp_path, capsys):
    run_and_expect_error(ours_to_hf.main, [str(tmp_path / "nothing"), str(tmp_path / "out")], capsys,
                         tmp_path / "out", "nothing: directory not found")


def test_export_of_a_run_directory_is_the_export_of_its_checkpoints(tmp_path):
    """ours_to_hf takes a training run directory as infer, lora and eval do: its checkpoints/
    (the latest complete step), byte for byte the export of that directory."""
    config = SHAPES["llama3"]
    save_params(tmp_path / "run" / "checkpoints", config, init_params(config, jax.random.key(0)))
    for source, output in (("run", "from_run"), ("run/checkpoints", "from_checkpoints")):
        assert run_cli(ours_to_hf.main, [str(tmp_path / source), str(tmp_path / output), "--dtype", "float32",
                                         "--bos-token-id", "1", "--eos-token-id", "2", "--no-progress"]) == 0
    files = sorted(p.name for p in (tmp_path / "from_checkpoints").iterdir())
    assert "config.json" in files and sorted(p.name for p in (tmp_path / "from_run").iterdir()) == files
    for name in files:
        assert (tmp_path / "from_run" / name).read_bytes() == (tmp_path / "from_checkpoints" / name).read_bytes()


def test_command_line_exits_2_with_one_line(tmp_path):
    (tmp_path / "meta").mkdir()
    run = subprocess.run([sys.executable, "-m", "llama_jax.convert.meta_to_ours", str(tmp_path / "meta"),
                          str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error:") and "consolidated" in run.stderr
    assert len([line for line in run.stderr.splitlines() if line.strip()]) == 1, run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("module", [hf_to_ours, meta_to_ours, ours_to_hf, quantize])
def test_every_converter_has_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage: python -m llama_jax.convert." in capsys.readouterr().out
