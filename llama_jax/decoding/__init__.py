"""Decoding as pure functions: what inference, evaluation and RL rollouts all compile.

  programs   prefill, the decode loop and one decode step over a state dict
  sampling   greedy, temperature, top-k and top-p, with per-row keys
  slots      the server's program: prefill into decode slots, and several decode
             steps with each token's log-probabilities (infer.batcher and
             train.compile --serve jit the same functions)
"""
