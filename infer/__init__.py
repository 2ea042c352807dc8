"""Inference: prefill and a compiled decode loop over a sharded KV cache.

`load_model(path)` reads our checkpoint or a Hugging Face directory;
`generate(params, tokenizer, prompts, ...)` runs greedy or sampled decoding,
optionally streaming. `python -m infer --help` is the command-line front.
"""

from infer.generate import Chunk, Generation, generate, load_model
from llama_jax.decoding.sampling import Sampling

__all__ = ["Chunk", "Generation", "Sampling", "generate", "load_model"]
