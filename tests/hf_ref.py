"""Tiny random transformers Llama 4 models, built in the test process, as the numerical reference."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import transformers

from llama4_jax import config as C


def hf_config(cfg: C.Llama4Config):
  """The transformers config object of one of our configs (built from our `to_hf` dict)."""
  d = C.to_hf(cfg)
  if cfg.vision is None:
    return transformers.Llama4TextConfig(**{k: v for k, v in d.items() if k != "architectures"})
  return transformers.Llama4Config(**{k: v for k, v in d.items() if k != "architectures"})


def randomise(model: torch.nn.Module, seed: int, router_scale: float = 3.0) -> None:
  """Re-draw every weight at O(1) activation scale (the release init of 0.02 makes everything ~0)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or "layernorm" in name:
        w = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
        if name.endswith("bias"):
          w = 0.1 * torch.randn(p.shape, generator=g)
      elif name.endswith("bias"):
        w = 0.1 * torch.randn(p.shape, generator=g)
      elif "embed_tokens" in name or "class_embedding" in name or "positional_embedding" in name:
        w = torch.randn(p.shape, generator=g)
      elif "gate_up_proj" in name:  # [E, D, 2I], x @ W
        w = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
      elif "experts.down_proj" in name:  # [E, I, D]
        w = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1])
      else:  # nn.Linear [out, in]
        w = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
        if "router" in name:
          w = w * router_scale
      p.copy_(w.to(p.dtype))


def build(cfg: C.Llama4Config, directory: str, seed: int = 0, causal_lm: bool = False,
          dtype: torch.dtype = torch.float32, **save_kw):
  """Builds, randomises and saves a transformers model; returns it in eager fp32 eval mode."""
  torch.manual_seed(seed)
  if causal_lm:
    text_cfg = hf_config(dataclasses.replace(cfg, vision=None))
    model = transformers.Llama4ForCausalLM(text_cfg)
  else:
    model = transformers.Llama4ForConditionalGeneration(hf_config(cfg))
  randomise(model, seed)
  model.eval()
  model.set_attn_implementation("eager")
  if dtype != torch.float32:
    model.save_pretrained(directory, **save_kw)
    model = type(model).from_pretrained(directory, dtype=dtype)
    model.eval()
    model.set_attn_implementation("eager")
  model.save_pretrained(directory, **save_kw)
  return model


def logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, **kw) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(input_ids, dtype=torch.long),
                attention_mask=None if attention_mask is None else torch.as_tensor(attention_mask), **kw)
  return out.logits.float().numpy()
