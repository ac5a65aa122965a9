"""experiments/quickstart.ipynb end to end on CPU: a real kernel (nbclient) runs every cell with the
parameter cell overridden to a tiny random multimodal checkpoint (HF layout, built here), a BPE
tokenizer trained here, and a few fine-tuning steps."""

from __future__ import annotations

import dataclasses
import os

import nbformat
from nbclient import NotebookClient

import hf_ref
from llama4_jax import config as C
from llama4_jax.data import hf_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "experiments", "quickstart.ipynb")


def _parameters_cell(nb) -> int:
  hits = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(hits) == 1, "the notebook needs exactly one cell tagged 'parameters'"
  return hits[0]


def test_quickstart_notebook_runs_end_to_end(tmp_path, monkeypatch):
  hf_dir = tmp_path / "hf"
  hf_ref.build(dataclasses.replace(C.TINY_SCOUT), str(hf_dir), seed=0)
  corpus = ["What is the capital of France? It is Paris. What is the largest planet? It is Jupiter.",
            "Answer in one short sentence. Write a two-line poem about the sea."] * 20
  tok_path = tmp_path / "tokenizer.json"
  hf_tokenizer.train_bpe(corpus, 300, tok_path)

  nb = nbformat.read(NOTEBOOK, as_version=4)
  i = _parameters_cell(nb)
  overrides = dict(INSTALL=False, HF_CHECKPOINT=str(hf_dir), WORK_DIR=str(tmp_path / "work"),
                   TOKENIZER=str(tok_path), STEPS=6, LR=3e-3, SEQ_LEN=64, BATCH=8, CONVERT_DTYPE="float32",
                   MAX_NEW_TOKENS=8)
  nb.cells.insert(i + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items())))

  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": REPO}})
  try:
    client.execute()
  finally:
    nbformat.write(nb, str(tmp_path / "executed.ipynb"))  # kept for inspection (pytest --basetemp)

  text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.get("output_type") == "stream")
  assert "rules" in text and "GiB per device planned" in text
  assert "validation loss (assistant tokens)" in text and "perplexity" in text
  run_dir = tmp_path / "work" / "runs" / "quickstart"
  assert (run_dir / "loss.png").exists() and (run_dir / "metrics.jsonl").exists()
  assert (run_dir / "checkpoints" / "6").is_dir()
  assert "> Write a two-line poem about the sea." in text
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert images, "the loss curve was not displayed"
