"""The benchmark suite runs end to end (tiny sizes) and rewrites only its own blocks of BENCHMARKS.md."""

import pytest

from benchmarks import run_all


@pytest.mark.slow
def test_quick_suite_and_doc_update(tmp_path):
  r = run_all.run(quick=True, runs_fwd=1, runs_train=1, runs_moe=1)
  for row in r["model_vs_torch"]:  # the same weights in both frameworks
    assert row["ours"]["max_abs_logit_diff_vs_torch"] < 1e-4
    assert row["ours_like_for_like"]["max_abs_logit_diff_vs_torch"] < 1e-4
  doc = tmp_path / "BENCHMARKS.md"
  doc.write_text("# Benchmarks\n\nhand-written text\n")
  run_all.update_docs(r, str(doc))
  first = doc.read_text()
  assert "hand-written text" in first and all(t in first for t in run_all.TITLES.values())
  run_all.update_docs(r, str(doc))
  assert doc.read_text() == first  # blocks replaced in place, nothing appended twice


def test_quant_quality_kl_and_top1_agreement():
  """The KL and top-1 columns of benchmarks/quant_quality.py: KL(p || q) = cross-entropy - entropy of the
  normalised probabilities (float64), zero against itself, and the share of rows whose argmax agrees."""
  import numpy as np

  from benchmarks.quant_quality import kl_and_agreement

  r = np.random.RandomState(0)
  logits = r.randn(64, 9)
  other = logits + 0.5 * r.randn(64, 9)
  log_softmax = lambda z: z - np.log(np.exp(z).sum(-1, keepdims=True))  # noqa: E731
  ref, lp = log_softmax(logits).astype(np.float32), log_softmax(other).astype(np.float32)
  p, q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), np.exp(other) / np.exp(other).sum(-1, keepdims=True)
  expected = float(np.mean(-(p * np.log(q)).sum(-1) + (p * np.log(p)).sum(-1)))
  kl, top1 = kl_and_agreement(ref, lp)
  assert kl > 0.01 and abs(kl - expected) < 1e-5 * expected
  assert top1 == float(np.mean(logits.argmax(-1) == other.argmax(-1))) and 0 < top1 < 1
  assert kl_and_agreement(ref, ref) == (0.0, 1.0)


def test_moe_matmul_floor_counts_its_six_matmuls():
  """benchmarks/moe_paths.floor: the forward's two and the backward's four matmuls, each timed at its fastest;
  the ratio is (forward + backward) / forward of those times, and the GFLOP/s divide 2 * blocks * b * 3 D I
  (forward) and twice that (backward)."""
  from benchmarks import moe_paths

  f = moe_paths.floor(hidden=16, width=8, experts=4, blocks=3, b=8, rounds=2)
  ms = f["ms"]
  assert set(ms) == {"gate_up", "down", "d_swiglu", "d_tokens", "d_gate_up", "d_down"} and min(ms.values()) > 0
  fwd, bwd = ms["gate_up"] + ms["down"], sum(ms.values()) - ms["gate_up"] - ms["down"]
  assert abs(f["fwd_ms"] - fwd) < 1e-9 and abs(f["bwd_ms"] - bwd) < 1e-9
  assert abs(f["ratio"] - (fwd + bwd) / fwd) < 1e-9
  assert abs(f["gflops"]["fwd"] - 2 * 3 * 8 * 3 * 16 * 8 / (fwd * 1e-3) / 1e9) < 1e-9
  calls = []
  best = moe_paths.fastest({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3)
  assert calls == ["a", "b"] * 4 and set(best) == {"a", "b"}  # a warm-up round, then turns
