"""Llama 3.2 Vision (11B, 90B): the image encoder and the cross-attention adapters.

A second model family beside the text one, built from its layers:
  config   `ModelConfig.vision` (llama_jax/config.py: `VisionConfig`)
  model    `LlamaVision` (model.py): the text model plus gated cross-attention layers
  encoder  `ImageEncoder` (encoder.py, layers.py): image tiles to features
  image    preprocessing equal to Hugging Face's MllamaImageProcessor (image.py)
  hf       Hugging Face `MllamaForConditionalGeneration` weights and config.json (hf.py)
docs/vision.md has the published facts and the design.
"""
