"""Training data: sources, packing, rows of examples and pairs, the grain pipeline.

  config               `DataConfig`: what a run's `data:` section holds
  pipeline             `make_dataset`: documents to packed rows to per-process batches
  sources              token directories, text, JSONL chat and completion, preference pairs
  prompts              JSONL prompts a policy answers (reinforcement learning, train/rl/)
  packing              documents into fixed-length rows with segment ids
  example_rows         whole fine-tuning examples and preference pairs as rows
  ranged_reads         byte ranges of local or gs:// token files
  reference_log_probs  DPO's reference log-probabilities computed once
"""
