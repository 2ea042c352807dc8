"""Text in and out: tokenizers, chat formats and tool use.

  tokenizer           SentencePiece (Llama 2) and tiktoken-format BPE (Llama 3)
  tokenizer_training  training a byte-level BPE for small runs
  stream_decoder      token ids to text as they stream, whole characters only
  chat                the Llama 2 and Llama 3 chat formats
  tool_use            Llama 3.1 tool definitions and calls
  chat_template       Hugging Face chat templates, rendered as transformers does
  guard_categories    Llama Guard 3's hazard categories, and custom ones
  guard_format        Llama Guard 3 prompts and verdicts
"""
