"""Ahead-of-time compiles of the run's own programs for a TPU slice.

  aot           builds and compiles the train, prefill, decode and serve programs
  cli           `python -m train.compile`: verdicts, tables, sweeps
  comms_report  the bytes-moved table and chart of a sweep
"""
