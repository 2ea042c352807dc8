"""Decoding as pure functions: what inference, evaluation and RL rollouts all compile.

  programs   prefill, the decode loop and one decode step over a state dict
  sampling   greedy, temperature, top-k and top-p, with per-row keys
  logprobs   each token's log-probability and the top alternatives
  groups     G samples per prompt from one prefill, with each token's log-probability
             and entropy (RL rollouts, train/rl/rollout.py)
  buckets    padded prompt and cache lengths (few shapes, few compiles)
  slots      the server's programs: prefill into decode slots, and several decode
             steps with each token's log-probabilities (infer.batcher and
             train.compile --serve jit the same functions, through jit_slot_programs)
"""
