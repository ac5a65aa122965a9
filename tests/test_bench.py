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
