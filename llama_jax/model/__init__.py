"""The Llama decoder and its layers, as Flax modules that name logical axes only.

  llama        `Llama`: embedding, the scanned decoder stack (of layers, or of
               blocks of a repeating layer pattern for Llama 4), norm and head
  layers       RMSNorm, projections (quantised, adapted) and the SwiGLU feed-forward
  moe          Llama 4's mixture-of-experts feed-forward (dropless, expert-parallel)
  attention    the one `attend` entry point; blocked_attention, splash and
               context_parallel are its implementations
  rope         rotary embeddings with Llama 3.1 frequency scaling
  swiglu       the feed-forward activation with its CPU backward pass
  kv_cache     the KV cache pytree (optionally int8/fp8)
  quantize     int8 and FP8 weights; lora: adapters beside the weights they adapt
  trees        stacking, unstacking, splitting and joining parameter trees
  mesh_context the mesh and rules of the active layout, for per-device kernels

llama_jax/params.py, above this folder and llama_jax/vision/, initialises,
counts and names the parameters of whichever model a config describes.
"""
