"""What a run minimises.

  objective      `Objective`: the shape every objective takes, which train/step.py differentiates
  cross_entropy  next-token loss with weights and z-loss, plain or chunked
  dpo            direct preference optimisation against a frozen reference
  reward         a reward model's Bradley-Terry loss on preference pairs (Llama 2)
  distill        logit distillation from a teacher
  grpo           group relative policy optimisation on rollouts (train/rl/)
  ppo            PPO's arithmetic (KL-shaped rewards, GAE, clipped value loss); no run uses it yet
  policy_gradient  what RL objectives share: the rollout batch's keys, sampled log-probs, KL estimators
  router         a mixture-of-experts model's router losses (Llama 4)
  run            the run config's choice of objective and its fixed model
"""
