"""The markdown report of a `benchmarks.gpu` run (its JSON): one table per section, skipped rows with their
reason, for the console and the GPU block of docs/BENCHMARKS.md."""

from __future__ import annotations

import math


def _n(v, spec=".1f") -> str:
  return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _skips(sec: dict) -> list[str]:
  return [f"- section {sec['skipped']}"] if sec.get("skipped") else []


def _table(header: list[str], rows: list[dict], lead, cells=None) -> list[str]:
  """Markdown table lines: per row its leading cells `lead(x)`, then `cells(x)` or, for a row with a "skipped"
  reason, the reason and empty cells to the end (without `cells`, `lead` gives the whole row)."""
  out = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for x in rows:
    row = lead(x)
    if cells is not None:
      row += [x["skipped"]] + [""] * (len(header) - len(row) - 1) if x.get("skipped") else cells(x)
    out.append("| " + " | ".join(row) + " |")
  return out


def _rate_cells(x: dict, rate: str) -> list[str]:
  """ms, the rate, its fraction of the bf16 peak and the compile time of a kernel row."""
  return [_n(x["ms"], ".2f"), _n(x[rate], ".3g"), _n(x["fraction_of_bf16_peak"], ".1%"), _n(x["compile_s"])]


def render(r: dict) -> str:
  m, pk = r["machine"], r.get("peaks", {})
  v = m["versions"]
  lines = []
  if not r["gpu"]:
    lines += [f"**{r['note']}**", ""]
  elif r["tiny"]:
    lines += ["**--tiny: a smoke test, not a measurement.**", ""]
  lines += [f"Measured {m['date']} at commit {m['commit']} on {m['devices']} x {m['device_kind']} "
            f"(backend {m['backend']}, {_n((m['memory_bytes'] or float('nan')) / 2 ** 30)} GiB usable), jax "
            f"{v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, optax {v['optax']}; whole run "
            f"{_n(r.get('wall_s'), '.0f')} s of a {r['budget_s']:.0f} s budget. Peaks: bf16 "
            f"{_n(pk.get('bf16', float('nan')) / 1e12, '.0f')} TFLOP/s ({pk.get('source')}), fp8 "
            f"{_n(pk.get('fp8', float('nan')) / 1e12, '.0f')} TFLOP/s ({pk.get('fp8_source')}), HBM "
            f"{_n(pk.get('hbm', float('nan')) / 1e12, '.2f')} TB/s ({pk.get('hbm_source')}).", ""]
  c = r["ceilings"]

  def rate(x):
    return x.get("skipped") or (f"{_n(x['tflops'], '.3g')} TFLOP/s ({x['n']}^3)" if x["what"] == "matmul"
                                else f"{_n(x['tb_per_s'], '.3g')} TB/s (read + write)")

  lines += ["Ceilings (random data, median):", ""]
  lines += _table(["what", "dtype", "rate", "compile (s)"], c["rows"],
                  lambda x: [x["what"], x["dtype"], rate(x), _n(x.get("compile_s"))])
  lines += _skips(c)
  t = r["train"]
  lines += ["", "### Train step"]
  if t.get("config"):
    k = t["config"]
    lines += ["", f"Config: L {k['layers']} ({'/'.join(k['layer_kinds'][:4])}... repeating), D {k['hidden']}, "
              f"H {k['heads']} / K {k['kv_heads']} x d {k['head_dim']}, E {k['experts']} top-{k['top_k']} + shared, "
              f"I {k['width']}, vocab {k['vocab']}, chunk {k['chunk']}; {k['n_active_matmul'] / 1e9:.3g} B active "
              f"matmul parameters, {k['total_params'] / 1e9:.3g} B in all; batch {k['batch']} x {k['seq']} tokens, "
              f"{k['train_flops'] / 1e12:.3g} TFLOP per step (6 N_active tokens + full-rectangle attention, "
              "benchmarks/model_vs_torch.py). bf16 parameters, AdamW, no remat."]
  lines += [""] + _table(
      ["precision", "moe_impl", "attention", "step (ms)", "tokens/s", "model TFLOP/s", "MFU vs bf16 peak",
       "MFU vs fp8 peak", "compile (s)", "loss first / last"], t["rows"],
      lambda x: [x["precision"], x["moe_impl"], x["attention_impl"]],
      lambda x: [_n(1e3 * x["step_s"], ".0f"), _n(x["tokens_per_s"], ",.0f"), _n(x["model_tflops"], ".3g"),
                 _n(x["mfu_vs_bf16_peak"], ".1%"), _n(x.get("mfu_vs_fp8_peak"), ".1%"), _n(x["compile_s"]),
                 f"{_n(x['first_loss'], '.3f')} / {_n(x['last_loss'], '.3f')}"])
  lines += _skips(t)
  d = r["decode"]
  lines += ["", "### Decode (generate, greedy, bf16, KV cache in bf16)", "",
            "HBM bound = B / ((weights touched + KV cache read) / HBM bandwidth); experts touched per MoE layer "
            "= E (1 - (1 - 1/E)^(B k)) (uniform routing); the cache is counted whole (its slots).", ""]
  lines += _table(
      ["batch", "prompt + new", "tokens/s", "step (ms)", "HBM bound tokens/s", "of bound",
       "weights / KV per step (GB)", "first call (s, compile incl.)"], d["rows"],
      lambda x: [str(x["batch"]), f"{x['prompt']} + {x['new_tokens']}"],
      lambda x: [_n(x["tokens_per_s"], ",.0f"), _n(x["step_ms"], ".2f"), _n(x["hbm_bound_tokens_per_s"], ",.0f"),
                 _n(x["fraction_of_bound"], ".1%"),
                 f"{x['weight_bytes_per_step'] / 1e9:.2f} / {x['kv_bytes_per_step'] / 1e9:.3f}", _n(x["first_call_s"])])
  lines += _skips(d)
  mo = r["moe"]
  lines += ["", "### Routed-expert paths (router + top-1 experts, bf16)", "",
            "Useful FLOPs: 2 N k 3 D I + router (fwd+bwd: 3x).", ""]
  lines += _table(["E", "tokens x D x I", "path", "pass", "ms", "useful TFLOP/s", "of bf16 peak", "compile (s)"],
                  mo["rows"], lambda x: [str(x["experts"]), f"{x['tokens']} x {x['hidden']} x {x['width']}",
                                         x["impl"], x["kind"]],
                  lambda x: _rate_cells(x, "useful_tflops"))
  lines += _skips(mo)
  ep = r["ep"]
  lines += ["", "### Expert-parallel dispatch (ragged_all_to_all vs padded all_to_all)", ""]
  if ep["rows"]:
    lines += _table(["mode", "devices", "E", "tokens", "fwd+bwd (ms)"], ep["rows"],
                    lambda x: [x["mode"], str(x["devices"]), str(x["experts"]), str(x["tokens"]),
                               x.get("skipped") or _n(x["fwd_bwd_ms"], ".2f")])
  lines += _skips(ep)
  a = r["attention"]
  lines += ["", f"### Attention kernels (batch 1, {a.get('heads')} q / {a.get('kv_heads')} kv heads x "
            f"{a.get('head_dim')}, bf16)", "",
            "TFLOP/s count the visible (causal) pairs, 4 H d per pair forward; fwd+bwd 3.5x forward.", ""]
  lines += _table(["T", "layer", "impl", "pass", "ms", "causal TFLOP/s", "of bf16 peak", "compile (s)"], a["rows"],
                  lambda x: [str(x["T"]), f"{x['layer']}" + (f" ({x['chunk']})" if x["chunk"] else ""), x["impl"],
                             x["kind"]],
                  lambda x: _rate_cells(x, "causal_tflops"))
  lines += _skips(a)
  return "\n".join(lines)
