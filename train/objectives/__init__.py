"""What a run minimises.

  cross_entropy  next-token loss with weights and z-loss, plain or chunked
  dpo            direct preference optimisation against a frozen reference
  distill        logit distillation from a teacher
  run            the run config's choice of objective and its fixed model
"""
