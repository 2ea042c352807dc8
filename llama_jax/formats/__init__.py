"""Weights on disk: our checkpoints, Hugging Face and Mllama tables, safetensors.

  checkpoint      our orbax checkpoint layout and config; checkpoint_io restores
                  it onto target shardings
  hf              the Hugging Face Llama name table and config.json both ways
  mllama          the Llama 3.2 Vision (Mllama) extension of that table
  safetensors_io  reading tensors (or slices of them) from safetensors files
  weights         `load_params`: any source (ours, a run, Hugging Face) onto a layout
  assemble        quantising and stacking layers as they stream in
"""
