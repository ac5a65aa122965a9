"""benchmarks/gpu.py without a GPU: the tiny mode runs every section end to end, says that no GPU is present,
writes a JSON in which every figure is finite or carries its skip reason, and leaves the docs alone unless
forced."""

import json
import math

import jax
import pytest

from benchmarks import gpu

METRICS = ("tflops", "tb_per_s", "step_s", "tokens_per_s", "ms", "fwd_bwd_ms")


def _finite(where: str, value) -> None:
  if isinstance(value, dict):
    for k, v in value.items():
      _finite(f"{where}.{k}", v)
  elif isinstance(value, (list, tuple)):
    for i, v in enumerate(value):
      _finite(f"{where}[{i}]", v)
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    assert math.isfinite(value), f"{where} = {value}"


def check(r: dict) -> None:
  """Every section present; each one either skipped with a reason or holding rows, and each row either
  skipped with a reason or measured (a metric, every number finite)."""
  for name in gpu.SECTIONS:
    sec = r[name]
    if sec.get("skipped"):
      assert isinstance(sec["skipped"], str) and sec["skipped"].startswith("not run"), (name, sec["skipped"])
      continue
    assert sec["rows"], f"{name}: no rows and no skip reason"
    for i, row in enumerate(sec["rows"]):
      if "skipped" in row:
        assert isinstance(row["skipped"], str) and row["skipped"], (name, row)
        continue
      assert any(m in row for m in METRICS), (name, row)
      _finite(f"{name}.rows[{i}]", {k: v for k, v in row.items() if k != "chunk"})
  _finite("peaks", {k: v for k, v in r["peaks"].items() if not k.endswith("source")})


def test_peak_table():
  assert gpu.peak_entry("NVIDIA H100 80GB HBM3") == "H100 SXM"
  assert gpu.peak_entry("NVIDIA H200") == "H200"
  assert gpu.peak_entry("NVIDIA H100 PCIe") is None
  assert gpu.peak_entry("NVIDIA A100-SXM4-80GB") is None
  assert gpu.PEAKS["H200"] == (989e12, 1979e12, 4.8e12)


def test_counts():
  assert gpu.causal_pairs(8, None) == 36
  assert gpu.causal_pairs(8, 4) == 2 * 10
  assert gpu.causal_pairs(10, 4) == 2 * 10 + 3
  assert gpu.experts_touched(16, 1) == pytest.approx(1.0)
  assert 13.9 < gpu.experts_touched(16, 32) < 14.0  # 16 (1 - (15/16)^32)


def test_sections_skip_with_reasons_and_docs_need_force(tmp_path, capsys):
  """Only the ceilings run (seconds): the other sections carry their skip reason; no docs without --force."""
  out, doc = tmp_path / "gpu.json", tmp_path / "BENCHMARKS.md"
  assert gpu.main(["--sections", "ceilings", "--out", str(out), "--update-docs", "--doc", str(doc)]) == 0
  r = json.loads(out.read_text())
  assert jax.default_backend() != "gpu"
  assert not r["gpu"] and r["tiny"] and "NO GPU PRESENT" in r["note"]
  check(r)
  assert all(r[name]["skipped"] == "not run: not in --sections" for name in gpu.SECTIONS if name != "ceilings")
  printed = capsys.readouterr().out
  assert "NO GPU PRESENT" in printed and "not writing" in printed and not doc.exists()
  doc.write_text("# Benchmarks\n\nhand-written text\n")
  assert gpu.main(["--report", str(out), "--update-docs", "--force", "--doc", str(doc)]) == 0
  first = doc.read_text()
  assert "hand-written text" in first and gpu.TITLE in first and "NO GPU PRESENT" in first
  gpu.main(["--report", str(out), "--update-docs", "--force", "--doc", str(doc)])
  assert doc.read_text() == first  # the block is replaced in place


@pytest.mark.slow  # every section compiles its programs: minutes on the shared 2-core box (see the report)
def test_tiny_run_end_to_end(tmp_path, capsys):
  out, doc = tmp_path / "gpu.json", tmp_path / "BENCHMARKS.md"
  assert gpu.main(["--out", str(out), "--budget-s", "3000", "--update-docs", "--doc", str(doc)]) == 0
  r = json.loads(out.read_text())
  check(r)
  assert not doc.exists() and "not writing" in capsys.readouterr().out
  measured = {name: [x for x in r[name]["rows"] if "skipped" not in x] for name in gpu.SECTIONS}
  assert {x["precision"] for x in measured["train"]} == {"bf16", "fp8 train"}
  assert all(x["first_loss"] > 0 and x["mfu_vs_bf16_peak"] > 0 for x in measured["train"])
  assert [x["batch"] for x in measured["decode"]] == list(gpu.TINY_SIZES.decode_batches)
  assert {x["impl"] for x in measured["moe"]} == {"sorted", "ragged", "dense"}
  assert all(x["max_abs_diff_vs_first"] < 0.1 for x in measured["moe"] if x["kind"] == "fwd")
  assert {x["impl"] for x in measured["attention"]} == {"blockwise"}  # cuDNN rows: skipped, no GPU
  assert all("needs a GPU" in x["skipped"] for x in r["attention"]["rows"] if x["impl"] == "cudnn")
  ep = r["ep"]  # the tests' 8 simulated CPU devices: dropless runs, ragged_all_to_all cannot compile on CPU
  assert ep.get("skipped") or any("skipped" in x and x["mode"] == "ragged" for x in ep["rows"])
