"""The loss-curve PNG written at the end of a run (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from typing import Sequence


def loss_curve(records: Sequence[dict], path: str, baseline: float | None = None, title: str = "") -> str:
  """Train loss (per step, and its running mean) and validation loss against step; `baseline` (e.g. the
  unigram cross-entropy) as a dashed line. Returns `path`."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
  val = [(r["step"], r["loss"]) for r in records if r.get("split") == "val" and "loss" in r]
  val += [(r["step"], r["val_loss"]) for r in records if r.get("split") == "final" and r.get("val_loss") is not None]
  val = sorted(dict(val).items())  # the final pass replaces a periodic one at the same step
  fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
  if train:
    steps, losses = zip(*train)
    w = max(1, len(losses) // 50)
    if w == 1:
      ax.plot(steps, losses, color="tab:blue", lw=1.6, label="train")
    else:
      ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train (step)")
      smooth = [sum(losses[max(0, i - w + 1): i + 1]) / len(losses[max(0, i - w + 1): i + 1])
                for i in range(len(losses))]
      ax.plot(steps, smooth, color="tab:blue", lw=1.6, label=f"train (mean of {w} steps)")
  if val:
    steps, losses = zip(*val)
    ax.plot(steps, losses, "o-", color="tab:orange", lw=1.6, ms=4, label="validation")
  if baseline is not None:
    ax.axhline(baseline, ls="--", color="gray", lw=1, label=f"unigram baseline {baseline:.2f}")
  ax.set_xlabel("step")
  ax.set_ylabel("cross-entropy (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
