"""Data: tokenizers, the chat format, images and prompts, sources, packing pipeline, the Shakespeare corpus.

Modules (import them directly):
  tokenizers       the `Tokenizer` protocol and `load_tokenizer("llama4" | path)`
  llama4_tiktoken  Meta's Llama 4 tiktoken BPE, offline
  hf_tokenizer     HF `tokenizer.json` tokenizers and byte-level BPE training
  sources          plain text, JSONL text and chat JSONL readers
  chat             the Llama 4 chat format (the release's template, token for token), with the SFT loss mask
  prompt           image token blocks and batched model inputs (ids, mask, pixel values) for prompts
  images           the Llama 4 image processor (tiling, resizing, normalisation) without torchvision
  pipeline         examples -> packed, shuffled, checkpointable grain batches
  shakespeare      the complete works, a train/validation split, the unigram baseline
"""
