"""Text in, text out: `load_model` and `generate`, one call each for a notebook.

    config, params, tokenizer = load_model("path/to/checkpoint")   # ours or a HF dir
    results = generate(params, tokenizer, ["Once upon a time"], config=config,
                       max_new_tokens=64, temperature=0.8, top_p=0.95, seed=1)
    print(results[0].text)

Streaming: pass `stream=callback`; it is called with a `Chunk` (row, new
token ids, newly completed text) as tokens arrive. The compiled decode loop
runs in chunks of `stream_every` steps, and the host hands each chunk to
the callback before calling the loop again with the donated state.

Why chunks rather than a host callback (`jax.debug.callback` / `io_callback`)
inside one loop: the loop stays a pure function, so it compiles and runs the
same on one CPU and on a multi-host TPU pod (a callback runs on every host
and needs ordered effects to keep tokens in order), and the accelerator
never waits for Python per token. One compiled program serves every chunk,
each call costs one dispatch and one small host transfer, and the chunk
size trades latency for overhead (1 = every token at once, the default 8
is invisible to a reader). Without a stream the whole generation is one call.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence

import numpy as np

from infer.engine import Engine, engine_for
from infer.options import ServingOptions
from llama_jax.decoding.sampling import Sampling
from llama_jax.config import ModelConfig
from llama_jax.paths import user_path
from llama_jax.text.grammar import GrammarVocabulary, RowMatchers, json_grammar
from llama_jax.text.stream_decoder import StreamDecoder
from llama_jax.text.tokenizer import Tokenizer, find_tokenizer, load_tokenizer
from sharding.layout import Layout
from llama_jax.formats.weights import load_params, stored_config
from llama_jax.vision.image import image_inputs, load_image


@dataclasses.dataclass
class Generation:
    """One prompt's result.

    text: the generated text (stop token excluded); tokens: the generated ids
    (stop token excluded); prompt_tokens: the prompt's ids; finish_reason:
    "stop" (a stop token) or "length" (max_new_tokens); logits: float32
    [len(tokens) (+1 if stopped), vocab] when asked for with return_logits.
    """

    text: str
    tokens: list[int]
    prompt_tokens: list[int]
    finish_reason: str
    logits: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Streamed output of one row: ids just generated and the text they complete."""

    row: int
    tokens: list[int]
    text: str


Prompts = str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]]
Images = Sequence[Sequence["Image.Image | str | os.PathLike"]]  # one list per prompt


def generate(params_or_checkpoint, tokenizer: Tokenizer | str | None, prompts: Prompts,
             max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, layout: str | Layout | None = None,
             config: ModelConfig | None = None, stream: Callable[[Chunk], None] | None = None,
             *, stop_ids: Sequence[int] | None = None, stream_every: int = 8,
             return_logits: bool = False, images: Images | None = None,
             json_schema: dict | bool | None = None) -> list[Generation]:
    """Generate a continuation of each prompt; one `Generation` per prompt, in order.

    params_or_checkpoint: a parameter tree (then `config` is required) or a
    checkpoint directory for `load_model`. tokenizer: a Tokenizer or a path
    (None: the checkpoint's; with token-id prompts it may stay None).
    prompts: a string, a list of strings (encoded with BOS), or token-id
    lists. temperature 0 is greedy; top_k/top_p filter before sampling; the
    same seed gives the same output. layout: a layout name (sharded over all
    devices) or None (one device). stop_ids: ids that end a row (default
    the tokenizer's stop ids). images (Llama 3.2 Vision): one list of images
    (PIL images or file paths) per prompt; a text prompt with images becomes
    `<|begin_of_text|>` + one `<|image|>` per image + the text (Meta's
    completion form), token-id prompts carry their own `<|image|>` ids.
    json_schema (structured outputs): every answer is a JSON value this schema admits, decoded
    under its grammar (`llama_jax.text.grammar`; one decode step per call), ending with a stop
    token once complete (or cut at max_new_tokens). Needs the tokenizer.
    Raises ValueError (one line) if a prompt plus max_new_tokens exceeds the
    context, for images a model cannot take, or on a bad setting.
    """
    if isinstance(params_or_checkpoint, (str, os.PathLike)):
        config, params, own_tokenizer = load_model(params_or_checkpoint, layout)
        tokenizer = tokenizer or own_tokenizer
    elif config is None:
        raise ValueError("generate: pass config= with a parameter tree (or a checkpoint path)")
    else:
        params = params_or_checkpoint
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    sampling = Sampling(float(temperature), top_k, top_p)
    if stream_every < 1:
        raise ValueError(f"stream_every must be >= 1, got {stream_every}")
    ids = _prompt_ids(tokenizer, prompts)
    image_arrays = None if images is None else _image_arrays(config, images, prompts, ids)
    stops = set(tokenizer.stop_ids if tokenizer is not None and stop_ids is None else stop_ids or ())
    grammars = None
    if json_schema is not None:
        if tokenizer is None:
            raise ValueError("generate: json_schema needs a tokenizer")
        grammar = json_grammar(json_schema, GrammarVocabulary(tokenizer, config.vocab_size))
        grammars = RowMatchers(len(ids), config.vocab_size)
        for row in range(len(ids)):
            grammars.start(row, grammar)

    engine = _engine(config, layout)
    params = engine.place_params(params)
    tokens = [[] for _ in ids]
    logits = [[] for _ in ids]
    stopped = [False] * len(ids)
    decoders = [StreamDecoder(tokenizer) if stream and tokenizer else None for _ in ids]
    for out_bn, logits_bnv in engine.run(params, ids, max_new_tokens, sampling, seed, stops,
                                         chunk=stream_every if stream else None,
                                         keep_logits=return_logits, images=image_arrays, grammars=grammars):
        for row, out_n in enumerate(out_bn):
            new = []
            for step, token in enumerate(out_n.tolist()):
                if token < 0 or stopped[row]:
                    continue
                if return_logits:
                    logits[row].append(logits_bnv[row, step])
                if token in stops:
                    stopped[row] = True
                else:
                    new.append(token)
            tokens[row] += new
            if stream and new:
                text = _feed(tokenizer, decoders[row], new)
                stream(Chunk(row, new, text))
    if stream:
        for row, decoder in enumerate(decoders):
            rest = decoder.flush() if decoder else ""
            if rest:
                stream(Chunk(row, [], rest))
    return [Generation(text=_decode(tokenizer, tokens[row]), tokens=tokens[row], prompt_tokens=ids[row],
                       finish_reason="stop" if stopped[row] else "length",
                       logits=np.stack(logits[row]) if return_logits else None)
            for row in range(len(ids))]


def load_model(path: str | os.PathLike, layout: str | Layout | None = None,
               tokenizer: str | os.PathLike | None = None, *, dtype: str | None = None,
               attention: str | None = None, quantize: str | None = None,
               kv_cache_dtype: str | None = None):
    """Load (config, params, tokenizer) from a checkpoint directory: `load_served` with
    `ServingOptions(layout, dtype, attention, quantize, kv_cache_dtype)` (infer/options.py).

    dtype ("bfloat16", "float32"): compute and parameter dtype; default the
    checkpoint's own (config.json's `torch_dtype` for both; our checkpoint's
    stored param_dtype and compute dtype). attention: "xla" or "blocked".
    quantize ("int8", "fp8"): quantise the weights as they load (a checkpoint
    saved quantised loads as it is). kv_cache_dtype ("int8", "fp8"):
    quantise the KV cache. layout: None means one device.
    """
    options = ServingOptions(layout, dtype=dtype, attention=attention, quantize=quantize,
                             kv_cache_dtype=kv_cache_dtype)
    return load_served(path, options, tokenizer)


def load_served(path: str | os.PathLike, options: ServingOptions, tokenizer: str | os.PathLike | None = None):
    """Load (config, params, tokenizer) from a checkpoint directory, served with `options`.

    A directory with `config.json` is read as Hugging Face (safetensors plus
    tokenizer files); anything else as our own checkpoint (llama_jax.formats.checkpoint:
    step directories with items "params" and "config", latest step), or a
    training run directory (its checkpoints/; a LoRA run's adapters come with
    the weights they adapt, see llama_jax.formats.weights).

    Weights are read one tensor (or layer slice) at a time, cast or quantised
    as `options` say, and placed on `options.layout` as they arrive, in the
    form the inference model takes (layers unrolled on CPU, see `Engine`), so
    host memory never holds a second copy of the model; the returned config's
    `scan_layers` says which form that is, and `generate` uses the params as
    they are. The tokenizer is `tokenizer` if given, else the one found in the
    directory or its parent. Raises ValueError subclasses with one line for
    anything missing or inconsistent.
    """
    path = user_path(path)
    config = options.model_config(checkpoint_config(path))
    if config.head != "lm":
        raise ValueError(f"{path}: a reward model (score head) gives one score per conversation, not tokens; "
                         "score conversations with python -m infer.score")
    engine = _engine(config, options.layout)
    target = config.replace(scan_layers=engine.model_config.scan_layers)
    params = load_params(path, target, engine.placement.param_shardings(target))
    return target, params, load_tokenizer(tokenizer or find_tokenizer(path))


def checkpoint_config(path: str | os.PathLike) -> ModelConfig:
    """The model config of a checkpoint (Hugging Face's config.json, ours, or a run's), nothing else read."""
    return stored_config(path)


def _engine(config: ModelConfig, layout: str | Layout | None) -> Engine:
    if layout is None or isinstance(layout, str):
        return engine_for(config, layout)
    return Engine(config, layout)


def _prompt_list(prompts: Prompts) -> list:
    """The prompts as a list (one string or one token-id list becomes a list of one)."""
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
        return [prompts]
    return list(prompts)


def _prompt_ids(tokenizer: Tokenizer | None, prompts: Prompts) -> list[list[int]]:
    ids = []
    for prompt in _prompt_list(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError("generate: text prompts need a tokenizer")
            ids.append(tokenizer.encode(prompt, bos=True))
        else:
            ids.append([int(t) for t in prompt])
    return ids


def _image_arrays(config: ModelConfig, images: Images, prompts: Prompts, ids: list[list[int]]):
    """The vision model's image arrays for these prompts; puts `<|image|>` ids after BOS of text prompts."""
    if config.vision is None:
        raise ValueError("images were given, but this model is text-only (its config has no vision "
                         "section); use a Llama 3.2 Vision checkpoint")
    if len(images) != len(ids):
        raise ValueError(f"images: give one list of images per prompt ({len(ids)}), got {len(images)}")
    loaded = []
    for row, (prompt, row_images) in enumerate(zip(_prompt_list(prompts), images)):
        loaded.append([load_image(i) if isinstance(i, (str, os.PathLike)) else i for i in row_images])
        if row_images and isinstance(prompt, str):
            ids[row][1:1] = [config.vision.image_token_id] * len(row_images)
    return image_inputs(loaded, ids, config.vision)


def _feed(tokenizer: Tokenizer | None, decoder: StreamDecoder | None, tokens: list[int]) -> str:
    if decoder is None:
        return ""
    return "".join(decoder.feed(t) for t in tokens if t < tokenizer.vocab_size)


def _decode(tokenizer: Tokenizer | None, tokens: list[int]) -> str:
    if tokenizer is None:
        return ""
    # A model's vocabulary may be padded past the tokenizer's; such ids carry no text.
    return tokenizer.decode([t for t in tokens if t < tokenizer.vocab_size])
