"""Per-device memory plan of a configuration on a mesh, and a chooser of the mesh that fits.

Parameters, gradients, optimizer state and the fp32 master copy are exact: they come from the
abstract model (`nnx.eval_shape`, nothing allocated) placed by the rules (`param_specs`, including the
replicated fallbacks of dimensions a mesh axis does not divide). Activations are an estimate:

  t  = tokens per device = batch * seq / (mesh axes act_batch splits the batch over) / (context: the axes
       act_seq splits the sequence over)
  b  = bytes per activation element (the policy dtype); scores and logits are float32 (4 bytes)
  tp = size of the tensor axis where the rules split heads / mlp / vocab, else 1
  Per layer, what the backward pass keeps (no remat), in elements per token:
    attention  a_att = 2 D + 2 (H + 2 K) d / tp  (norm in/out, q k v and their rotated copies)
                       + H d / tp                 (attention output)
                       + (4/b) H S / tp            (float32 scores, by Policy.attention_impl:
                                                    "dense": S = seq on every layer; "xla": S = 2 chunk on
                                                    chunked layers (chunk-local blocks), seq on global ones;
                                                    "blockwise" / "cudnn" / "splash" (and "auto"): S = 1,
                                                    only the log-sum-exp: no [T, S] array exists)
    dense MLP  a_mlp = D + 3 F / tp                (input, gate, up, silu*up)
    MoE        a_moe = D + (4/b) E + k (D + 3 I / tpe) + 3 I / tp  (router logits, routed, shared)
  a_layer = t * b * (a_att + a_ffn)
  remat "none":    L * a_layer
  remat "full" / "dots" / "minimal" (scan over blocks of p layers, block inputs saved):
                   (L / p) * t * b * D  +  p * a_layer   (one block recomputed at a time)
  + logits and their gradient: 2 * t' * V / tp * 4, t' = min(t, rows * Policy.logits_chunk) (the training
    loss computes the logits a slice of the sequence at a time)
  + expert-parallel dropless buffers of one MoE layer: 4 * n * t * k * D * b   (n = expert axis size)
  + context parallelism, one global layer's visiting keys and values (`sharding.sequence`): the gathered
    seq * 2 K d b / tp (all-gather variant) when that fits in the gather limit, else two ring blocks
Serving (train=False): one layer's a_layer + the logits of the last position, plus the KV cache
  (batch per device) * (L_rope * min(chunk, seq) + L_nope * seq / context) * 2 K d b / tp
(RoPE layers never need more than a chunk of keys; the global layers' slots split over the context axis).
An int8 KV cache (`Workload.kv_cache_dtype="int8"`, `cache.Int8KV`) holds 2 K (d + 4) bytes per layer and
token (values and float32 scales) instead of 2 K d b, plus the dequantised copy (dtype b) of one global
layer's keys and values that its attention reads.
A long prompt is prefilled in slices (`generate.stream(prefill_chunk=...)`): `Workload.prefill_chunk`
bounds the tokens of one forward. Training keeps AdamW's m and v in float32 (8 bytes per parameter), the
gradient in the parameter dtype, and an fp32 master copy when parameters are stored in a lower precision
and `master_fp32`.

Weight-only int8 / int4 weights (`Policy.quant`) count at their stored bytes (values and scales, from the
abstract model).

LoRA (`lora=LoraConfig`, `model.lora`, trained by `train.lora`): the base is frozen in its stored dtype (bf16,
FP8 experts or int8 / int4: QLoRA) with no gradient, optimizer state or master copy; the adapters (and routers
with `train_router`) are the trainable parameters: their gradient, AdamW m and v and fp32 master copy. Both
are exact, from `io.adapters.LoraLayout.build` on the abstract model placed by the rules (`MemoryPlan.adapters`
is the adapters' share of `params`). The activations add the largest layer's float copy of its adapted and
dequantised weights, which the forward builds inside the scanned block (dequantised base + scale * A @ B),
and the float32 gradient of its adapted ones (the backward pass reaches A and B through it).

The estimate ignores XLA's temporary buffers and fragmentation (including the dequantised
copy of one expert's weights a quantised matmul may materialise): plans keep `headroom` (10%) free.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from llama4_jax.config import Llama4Config, LoraConfig, Policy
from llama4_jax.io.adapters import LoraLayout
from llama4_jax.model import llama4
from sharding.mesh import MeshConfig
from sharding.params import param_specs, shard_bytes
from sharding.rules import (
  DATA_PARALLEL,
  EXPERT_PARALLEL,
  FSDP,
  FSDP_TP,
  INFERENCE,
  MESH_AXES,
  Rules,
  SequenceDispatch,
  with_context,
)

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Hardware:
  name: str
  devices: int
  hbm_gib: float  # memory per device


HARDWARE = {
    "1xh100": Hardware("1x H100 80GB", 1, 80.0),
    "1xh200": Hardware("1x H200 141GB", 1, 140.0),
    "8xh100": Hardware("8x H100 80GB", 8, 80.0),
    "8xh200": Hardware("8x H200 141GB", 8, 140.0),
    "v5p-64": Hardware("TPU v5p-64 (32 chips)", 32, 95.0),
    "v5p-128": Hardware("TPU v5p-128 (64 chips)", 64, 95.0),
    "v5p-512": Hardware("TPU v5p-512 (256 chips)", 256, 95.0),
    "v6e-256": Hardware("TPU v6e-256", 256, 32.0),
    "v5e-8": Hardware("TPU v5e-8", 8, 16.0),
    "v6e-8": Hardware("TPU v6e-8", 8, 32.0),
}


@dataclasses.dataclass(frozen=True)
class Workload:
  """What one step runs."""

  batch: int = 256  # global sequences per step
  seq: int = 8192  # tokens per sequence
  train: bool = True  # False: parameters only (+ activations of a forward, no optimizer)
  remat: str = "full"  # "none" | "full" | "dots" | "minimal" (see Policy.remat)
  master_fp32: bool = True  # keep an fp32 master copy when parameters are stored in a lower precision
  prefill_chunk: int = 0  # serving: tokens per forward of a sliced prefill (0: the whole prompt at once)
  kv_cache_dtype: str = ""  # serving: KV cache dtype ("": the policy dtype; "int8": values + per-token scales)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device bytes."""

  rules: str
  mesh: dict
  params: int
  grads: int
  optimizer: int  # AdamW m and v in float32
  master: int  # fp32 master copy (0 when parameters are fp32 or master_fp32 is off)
  activations: int
  tokens_per_device: int
  notes: tuple[str, ...] = ()
  adapters: int = 0  # LoRA: bytes of the trainable adapters (+ routers), part of `params`; the rest is frozen

  @property
  def frozen(self) -> int:
    """Bytes of the frozen base under LoRA (0 for full training)."""
    return self.params - self.adapters if self.adapters else 0

  @property
  def total(self) -> int:
    return self.params + self.grads + self.optimizer + self.master + self.activations

  def fits(self, hbm_gib: float, headroom: float = 0.10) -> bool:
    return self.total <= hbm_gib * GiB * (1 - headroom)


def _sizes(mesh: MeshConfig | Mapping[str, int], devices: int | None = None) -> dict[str, int]:
  if isinstance(mesh, MeshConfig):
    if devices is None:
      if -1 in mesh.sizes_dict().values():
        raise ValueError(f"mesh {mesh.sizes_dict()} has a -1 axis: pass `devices` to plan it")
      devices = math.prod(mesh.sizes_dict().values())
    return mesh.shape(devices)
  return {a: int(mesh.get(a, 1)) for a in MESH_AXES}


def _split(rules: Rules, name: str, size: int, sizes: Mapping[str, int]) -> int:
  """Factor by which the rules split a dimension of `size` named `name` (1 if not divisible)."""
  n = math.prod(sizes[a] for a in rules.axes(name))
  return n if size % n == 0 else 1


_SCORES = {"dense": "all", "xla": "chunk-local"}  # implementations that keep float32 scores


def activation_bytes(cfg: Llama4Config, policy: Policy, rules: Rules, sizes: Mapping[str, int],
                     work: Workload) -> tuple[int, int]:
  """(activation bytes per device, tokens per device) by the formula of the module docstring."""
  t_cfg = cfg.text
  b = jnp.dtype(policy.dtype).itemsize
  m = _split(rules, "act_batch", work.batch, sizes)
  c = _split(rules, "act_seq", work.seq, sizes)
  rows = work.batch // m if work.batch % m == 0 else work.batch  # sequences per device
  fwd_seq = min(work.seq, work.prefill_chunk) if work.prefill_chunk and not work.train else work.seq
  t = rows * fwd_seq // c
  D, H, K, d = t_cfg.hidden_size, t_cfg.num_attention_heads, t_cfg.num_key_value_heads, t_cfg.head_dim
  tp_h = _split(rules, "act_heads", H, sizes)
  tp_k = _split(rules, "act_kv_heads", K, sizes)
  tp_f = _split(rules, "mlp", t_cfg.intermediate_size_mlp, sizes)
  tp_i = _split(rules, "expert_mlp", t_cfg.intermediate_size, sizes)
  tp_v = _split(rules, "act_vocab", t_cfg.vocab_size, sizes)
  E, k, I, F = t_cfg.num_local_experts, t_cfg.num_experts_per_tok, t_cfg.intermediate_size, t_cfg.intermediate_size_mlp
  n_exp = _split(rules, "experts", E, sizes)
  C = min(t_cfg.attention_chunk_size, work.seq)
  scores = _SCORES.get(policy.attention_impl)
  gathered = work.seq * 2 * K * d * b / tp_k * rows  # one global layer's keys + values, all devices' tokens
  limit = (rules.sequence or SequenceDispatch()).gather_limit_bytes
  visiting = (gathered if gathered <= limit or c <= 2 else 2 * gathered / c) if c > 1 else 0.0

  def per_layer(i: int) -> float:
    rope = t_cfg.use_rope(i)
    S = {"all": work.seq, "chunk-local": 2 * C if rope else work.seq}.get(scores, 1)
    att = 2 * D + 2 * (H + 2 * K) * d / tp_h + H * d / tp_h + (4 / b) * H * S / tp_h
    if t_cfg.is_moe(i):
      ffn = D + (4 / b) * E + k * (D + 3 * I / tp_i) + 3 * I / tp_i
    else:
      ffn = D + 3 * F / tp_f
    return t * b * (att + ffn) + (0 if rope else visiting)

  L, p = t_cfg.num_hidden_layers, t_cfg.layer_period
  if not work.train:
    acts = max(per_layer(i) for i in range(L))  # a forward keeps only the current layer alive
    n_rope = sum(t_cfg.use_rope(i) for i in range(L))
    c_cache = _split(rules, "act_cache", work.seq, sizes)
    cached = n_rope * C + (L - n_rope) * work.seq / c_cache
    if work.kv_cache_dtype == "int8":  # int8 values + a float32 scale per token and head; one layer dequantised
      acts += rows * cached * 2 * K * (d + 4) / tp_k + rows * work.seq / c_cache * 2 * K * d * b / tp_k * (L > n_rope)
    else:
      kv_b = jnp.dtype(work.kv_cache_dtype).itemsize if work.kv_cache_dtype else b
      acts += rows * cached * 2 * K * d * kv_b / tp_k
    acts += rows * t_cfg.vocab_size / tp_v * 4  # the last position's logits
  else:
    if work.remat == "none":
      acts = sum(per_layer(i) for i in range(L))
    else:
      acts = (L // p) * t * b * D + sum(per_layer(i) for i in range(p))
    chunk = policy.logits_chunk
    logit_tokens = rows * chunk if chunk and chunk * c < work.seq else t  # the loss's logits, a slice at a time
    acts += 2 * logit_tokens * t_cfg.vocab_size / tp_v * 4
  if n_exp > 1 and t_cfg.moe_layer_ids:
    acts += 4 * n_exp * t * k * D * b
  return int(acts), t


def _per_device(state, rules: Rules, sizes: Mapping[str, int]) -> tuple[int, int, list[str]]:
  """(elements, bytes in each array's own dtype, notes) per device of a state (or model) placed by `rules`."""
  specs, notes = param_specs(state, rules, sizes)
  elems = held = 0
  for var, spec in zip(jax.tree.leaves(nnx.state(state), is_leaf=_is_var), jax.tree.leaves(specs, is_leaf=_is_var)):
    elems += shard_bytes(var.shape, jnp.int8, spec.get_value(), sizes)
    held += shard_bytes(var.shape, var.dtype, spec.get_value(), sizes)
  return elems, held, notes


def lora_parts(abstract, lora: LoraConfig) -> LoraLayout:
  """The LoRA templates of an abstract model (to reuse across `plan` calls)."""
  return LoraLayout.build(abstract, lora)


def _layer_copy(parts: LoraLayout, policy: Policy, rules: Rules, sizes: Mapping[str, int]) -> int:
  """Per-device bytes of the largest layer's float copy of its adapted and dequantised weights (compute dtype),
  plus the float32 gradient of the adapted ones (the backward pass reaches A and B through it)."""
  adapted = {s.path for s in parts.specs}
  built = adapted | {p for p, _ in parts.stored}
  flat = [(p, v) for p, v in nnx.to_flat_state(parts.base) if p in built]
  if not flat:
    return 0
  specs, _ = param_specs(nnx.from_flat_state(flat), rules, sizes)
  per_layer: dict[tuple, int] = {}
  for (path, var), spec in zip(flat, jax.tree.leaves(specs, is_leaf=_is_var)):
    n = shard_bytes(var.shape, jnp.int8, spec.get_value(), sizes) // var.shape[0]  # one scanned block's slice
    layer = path[: path.index("layers") + 2] if "layers" in path else path
    per_layer[layer] = per_layer.get(layer, 0) + n * (jnp.dtype(policy.dtype).itemsize + 4 * (path in adapted))
  return max(per_layer.values())


def plan(cfg: Llama4Config, policy: Policy, rules: Rules, mesh: MeshConfig | Mapping[str, int],
         work: Workload = Workload(), devices: int | None = None, abstract=None, lora: LoraConfig | None = None,
         parts: LoraLayout | None = None) -> MemoryPlan:
  """Per-device memory of `cfg` under `rules` on a mesh of the given axis sizes (no devices needed).
  `abstract`: the abstract model of (cfg, policy), to reuse across calls. `lora`: train LoRA adapters on the
  frozen base (`parts`: its `lora_parts`, to reuse)."""
  sizes = _sizes(mesh, devices)
  abstract = abstract if abstract is not None else llama4.abstract(cfg, policy)
  pb = jnp.dtype(policy.param_dtype).itemsize
  acts, t = activation_bytes(cfg, policy, rules, sizes, work)
  train = work.train
  mesh_used = {a: n for a, n in sizes.items() if n > 1} or {"data": 1}
  if lora is not None or parts is not None:
    parts = parts if parts is not None else lora_parts(abstract, lora)
    elems, adapters, notes = _per_device(parts.params, rules, sizes)  # trainable: adapters (+ routers)
    _, frozen, base_notes = _per_device(parts.frozen, rules, sizes)
    ab = max((jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(nnx.to_pure_dict(parts.params))), default=4)
    if train:
      acts += _layer_copy(parts, policy, rules, sizes)
    return MemoryPlan(rules=rules.name, mesh=mesh_used, params=frozen + adapters, grads=elems * ab if train else 0,
                      optimizer=8 * elems if train else 0,
                      master=4 * elems if train and work.master_fp32 and ab < 4 else 0, activations=acts,
                      tokens_per_device=t, notes=tuple(base_notes + notes), adapters=adapters)
  elems, held, notes = _per_device(abstract, rules, sizes)  # bytes: each array's own dtype, e.g. FP8 experts
  master = 4 * elems if train and work.master_fp32 and pb < 4 else 0
  return MemoryPlan(rules=rules.name, mesh=mesh_used, params=held, grads=elems * pb if train else 0,
                    optimizer=8 * elems if train else 0, master=master, activations=acts, tokens_per_device=t,
                    notes=tuple(notes))


def candidates(cfg: Llama4Config, devices: int, train: bool = True,
               seq: int | None = None) -> Iterable[tuple[Rules, dict[str, int]]]:
  """Layouts worth trying on `devices` devices (powers of two per axis). Training: pure data parallel,
  FSDP, expert parallel (expert | E) + FSDP, FSDP + tensor (tensor | kv heads, <= 8). Serving: data
  parallel and the inference preset (tensor x expert, the rest data). With `seq`, each of those also with
  the sequence split over a `context` axis dividing it (context parallelism)."""
  t = cfg.text
  pows = [2 ** i for i in range(int(math.log2(devices)) + 1) if devices % 2 ** i == 0]
  ctxs = [1] + [c for c in pows[1:] if seq is not None and seq % c == 0]

  def with_ctx(rules, sizes):
    for c in ctxs:
      left = devices // math.prod(n for a, n in sizes.items() if a != "data")
      if left % c == 0 and (c == 1 or sizes.get("data", 1) % c == 0):
        yield (rules, sizes) if c == 1 else (with_context(rules), {**sizes, "data": sizes["data"] // c,
                                                                     "context": c})

  yield from with_ctx(DATA_PARALLEL, {"data": devices})
  if not train:
    for tp in (p for p in pows if p <= 8 and t.num_key_value_heads % p == 0):
      for e in (p for p in pows if devices % (tp * p) == 0 and t.num_local_experts % p == 0):
        if tp * e > 1:
          yield from with_ctx(INFERENCE, {"data": devices // (tp * e), "expert": e, "tensor": tp})
    return
  for f in pows[1:]:
    yield from with_ctx(FSDP, {"data": devices // f, "fsdp": f})
  for e in pows[1:]:
    if t.num_local_experts % e == 0:
      for f in (p for p in pows if devices % (e * p) == 0):
        yield from with_ctx(EXPERT_PARALLEL, {"data": devices // (e * f), "fsdp": f, "expert": e})
  for tp in (p for p in pows[1:] if p <= 8 and t.num_key_value_heads % p == 0):
    for f in (p for p in pows if devices % (tp * p) == 0):
      yield from with_ctx(FSDP_TP, {"data": devices // (tp * f), "fsdp": f, "tensor": tp})


def choose_mesh(cfg: Llama4Config, policy: Policy, hardware: Hardware, work: Workload = Workload(),
                headroom: float = 0.10, strict: bool = True, abstract=None,
                lora: LoraConfig | None = None) -> tuple[MeshConfig, Rules, MemoryPlan]:
  """The layout that fits with the least model parallelism: among the candidates whose plan fits in
  `hardware.hbm_gib * (1 - headroom)` and whose batch splits over its batch axes (no device repeating
  another's work), the one with the largest `data` axis (fewest per-layer collectives), then the least
  memory. If none fits: ValueError naming the smallest plan, or (with
  `strict=False`) that smallest plan itself. `lora`: plans of LoRA training (see `plan`)."""
  abstract = abstract if abstract is not None else llama4.abstract(cfg, policy)
  parts = lora_parts(abstract, lora) if lora is not None else None
  best, smallest = None, None
  for rules, sizes in candidates(cfg, hardware.devices, work.train, work.seq):
    p = plan(cfg, policy, rules, sizes, work, abstract=abstract, parts=parts)
    if smallest is None or p.total < smallest[2].total:
      smallest = (rules, sizes, p)
    if p.fits(hardware.hbm_gib, headroom):
      split = math.prod(sizes.get(ax, 1) for ax in rules.axes("act_batch"))
      idle = work.batch % split != 0  # the batch does not split over its axes: devices would repeat the work
      key = (idle, -sizes.get("data", 1), p.total)
      if best is None or key < best[0]:
        best = (key, rules, sizes, p)
  if best is None:
    rules, sizes, p = smallest
    if strict:
      raise ValueError(f"no layout fits {hardware.name} ({hardware.hbm_gib} GiB/device): the smallest is "
                       f"{rules.name} {sizes} at {p.total / GiB:.1f} GiB/device")
  else:
    _, rules, sizes, p = best
  return MeshConfig(**{a: sizes.get(a, 1) for a in MESH_AXES}), rules, p


def longest_context(cfg: Llama4Config, policy: Policy, hardware: Hardware, work: Workload = Workload(train=False),
                    step: int = 1024, limit: int | None = None,
                    headroom: float = 0.10) -> tuple[int, MemoryPlan | None]:
  """Serving: the longest sequence (a multiple of `step`, at most `limit`, default the config's
  max_position_embeddings) for which some layout of `hardware` fits `work` (its batch, prefill chunk), and
  that plan; (0, None) when not even `step` tokens fit. Bisection: memory grows with the sequence."""
  hi = (limit or cfg.text.max_position_embeddings) // step
  model = llama4.abstract(cfg, policy)

  def fit(n):
    try:
      return choose_mesh(cfg, policy, hardware, dataclasses.replace(work, seq=n * step, train=False), headroom,
                         abstract=model)[2]
    except ValueError:
      return None

  lo, best = 0, None
  while lo < hi:
    mid = (lo + hi + 1) // 2
    p = fit(mid)
    if p is not None:
      lo, best = mid, p
    else:
      hi = mid - 1
  return lo * step, best


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)
