"""Grammar libraries for structured outputs, compared on our tokenizers (docs/serving.md).

    pip install xgrammar==0.2.9 outlines-core==0.2.14   # beside the pinned llguidance; xgrammar needs torch
    python bench/grammar_libraries.py [--libraries llguidance,xgrammar,outlines-core]

For each library and tokenizer (Llama 3's `tokenizer.model` shipped in llama-models, and a
byte-level BPE trained here as the tests train theirs): the time to build the library's
vocabulary from our `Tokenizer.token_bytes`, to compile a JSON schema (nested object, enum,
array, required fields) and `json_object`, and to compute each step's token mask while a
JSON document is fed token by token (median and max over its tokens). Every fed token must be
allowed and stop tokens allowed at the end: the run fails otherwise. Prints JSON lines;
measures only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
from common import cpu_model, emit  # noqa: E402  (bench/, this script's directory)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "kind", "owner"],
          "properties": {"name": {"type": "string"}, "kind": {"enum": ["cat", "dog", "llama"]},
                         "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
                         "owner": {"type": "object", "required": ["city"],
                                   "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}}}}}
DOCUMENT = {"name": "Fluffy the second", "kind": "llama", "age": 7, "tags": ["soft", "white", "tall"],
            "owner": {"city": "Oslo", "zip": 150}}
ANY_OBJECT = {"type": "object"}


def allowed(bits, token: int) -> bool:
    return bool((int(bits[token // 32]) >> (token % 32)) & 1)


def fed(fill, consume, bits, ids, stops) -> dict:
    """Per-step mask times while `ids` are fed; checks each is allowed and a stop token after."""
    times = []
    for token in ids:
        start = time.perf_counter()
        fill()
        times.append(time.perf_counter() - start)
        assert allowed(bits, token), f"token {token} of the document was masked out"
        consume(token)
    fill()
    assert any(allowed(bits, stop) for stop in stops), "no stop token allowed after the document"
    return {"mask_us_median": 1e6 * statistics.median(times), "mask_us_max": 1e6 * max(times)}


def llguidance_runs(tokenizer, ids, stops):
    import llguidance.numpy

    from llama_jax.text.grammar import JSON_OPTIONS, GrammarVocabulary

    start = time.perf_counter()
    vocabulary = GrammarVocabulary(tokenizer)
    yield "build_s", time.perf_counter() - start, {}
    for name, schema in (("schema", SCHEMA), ("json_object", ANY_OBJECT)):
        start = time.perf_counter()
        matcher = llguidance.LLMatcher(vocabulary.tokenizer,
                                       llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS))
        assert not matcher.is_error(), matcher.get_error()
        yield "compile_ms", 1e3 * (time.perf_counter() - start), {"grammar": name}
        bits = llguidance.numpy.allocate_token_bitmask(1, tokenizer.vocab_size)
        for metric, value in fed(lambda: llguidance.numpy.fill_next_token_bitmask(matcher, bits), matcher.consume_token,
                                 bits[0], ids, stops).items():
            yield metric, value, {"grammar": name}


def xgrammar_runs(tokenizer, ids, stops):
    import xgrammar

    start = time.perf_counter()
    vocab = [b"" if i in tokenizer.special_ids else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=tokenizer.vocab_size,
                                  stop_token_ids=sorted(stops))
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    yield "build_s", time.perf_counter() - start, {}
    for name in ("schema", "json_object"):
        start = time.perf_counter()
        grammar = (compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False) if name == "schema"
                   else compiler.compile_builtin_json_grammar())
        matcher = xgrammar.GrammarMatcher(grammar)
        yield "compile_ms", 1e3 * (time.perf_counter() - start), {"grammar": name}
        bits = xgrammar.allocate_token_bitmask(1, tokenizer.vocab_size)
        for metric, value in fed(lambda: matcher.fill_next_token_bitmask(bits), matcher.accept_token,
                                 bits[0], ids, stops).items():
            yield metric, value, {"grammar": name}


def outlines_runs(tokenizer, ids, stops):
    import outlines_core

    start = time.perf_counter()
    table = {}
    for i in range(tokenizer.vocab_size):
        if i not in tokenizer.special_ids:
            table.setdefault(tokenizer.token_bytes(i), []).append(i)
    vocabulary = outlines_core.Vocabulary(tokenizer.eos_id, table)
    yield "build_s", time.perf_counter() - start, {}
    for name, schema in (("schema", SCHEMA), ("json_object", ANY_OBJECT)):
        start = time.perf_counter()
        regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(schema))
        guide = outlines_core.Guide(outlines_core.Index(regex, vocabulary))
        yield "compile_ms", 1e3 * (time.perf_counter() - start), {"grammar": name}
        bits = np.zeros((1, (tokenizer.vocab_size + 31) // 32), np.int32)
        for metric, value in fed(lambda: guide.write_mask_into(bits.ctypes.data, bits.size, 4), guide.advance,
                                 bits[0], ids, [tokenizer.eos_id]).items():
            yield metric, value, {"grammar": name}


RUNS = {"llguidance": llguidance_runs, "xgrammar": xgrammar_runs, "outlines-core": outlines_runs}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--libraries", default=",".join(RUNS))
    args = parser.parse_args()
    import llama_models

    from llama_jax.text.tokenizer import load_tokenizer
    from llama_jax.text.tokenizer_training import train_bpe

    tokenizers = {"llama3": load_tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")}
    with tempfile.TemporaryDirectory() as work:
        train_bpe(["The llama is a camelid.", '{"name": "x", "tags": [1, 2]}', "Oslo is a city."] * 30, 600,
                  os.path.join(work, "tokenizer.model"))
        tokenizers["test_bpe"] = load_tokenizer(work)
    print(json.dumps({"bench": "grammar_libraries", "cpu": cpu_model(), "cores": os.cpu_count()}), flush=True)
    text = json.dumps(DOCUMENT)
    for library in args.libraries.split(","):
        for name, tokenizer in tokenizers.items():
            ids = tokenizer.encode(text)
            for metric, value, extra in RUNS[library](tokenizer, ids, tokenizer.stop_ids):
                emit("grammar_libraries", library, name, metric, value, metric.rsplit("_", 1)[-1]
                     if not metric.startswith("mask") else "us", vocab=tokenizer.vocab_size, steps=len(ids), **extra)


if __name__ == "__main__":
    main()
