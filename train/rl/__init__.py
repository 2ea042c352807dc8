"""Reinforcement learning on the run's own mesh: rollouts from the policy's live parameters.

  rollout  answers sampled from the policy (llama_jax/decoding/groups.py), laid out as an
           update batch, checked against the training forward pass, with the reference's
           log-probabilities
  rewards  a Python function (verifiable rewards) or a reward model
  step     one RL step: rollout, rewards, advantages, the update program
  build    an RL run's step from its config (GRPO: train/objectives/grpo.py)
  toy_rewards  the verifiable reward of configs/runs/grpo_tiny.yaml's sums
"""
