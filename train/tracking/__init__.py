"""Where a run reports: metrics.jsonl and TensorBoard, Weights & Biases, library logs.

  metrics        `MetricsWriter`, FLOPs per token and the chips' peaks
  wandb_logging  the optional Weights & Biases run
  goodput        where a run's wall time went, across restarts (goodput_report: text, picture)
  library_logs   what orbax, tensorstore and asyncio print, kept off the console
"""
