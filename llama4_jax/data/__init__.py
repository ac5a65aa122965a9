"""Training data: tokenizers, sources, packing pipeline, the Shakespeare corpus.

Modules (import them directly):
  tokenizers       the `Tokenizer` protocol and `load_tokenizer("llama4" | path)`
  llama4_tiktoken  Meta's Llama 4 tiktoken BPE, offline
  hf_tokenizer     HF `tokenizer.json` tokenizers and byte-level BPE training
  sources          plain text, JSONL text and chat JSONL readers
  chat             Llama 4 chat rendering with an assistant-only loss mask
  pipeline         examples -> packed, shuffled, checkpointable grain batches
  shakespeare      the complete works, a train/validation split, the unigram baseline
"""
