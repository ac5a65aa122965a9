"""The one check of stored tensors against what a config implies, used by every loader and both conversion
directions: each expected name present with the implied shape and an allowed dtype, nothing unexpected.
Errors name the file (or parameter directory) and the key, and are raised before a byte of weights is read.
The values themselves are checked as they stream through (`check_finite`: NaN / inf).
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping, NamedTuple

import ml_dtypes
import numpy as np

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded or converted; the message names the file and key."""


class Stored(NamedTuple):
  """What a checkpoint says about one tensor: where it is, its shape and its dtype name."""

  location: str  # file (safetensors) or parameter directory (Orbax)
  shape: tuple[int, ...]
  dtype: str  # safetensors dtype name ("F32", "BF16", ...) or numpy name ("float32", ...)


def _more(names: list) -> str:
  return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


class Validator:
  """Checks a mapping of stored tensors name by name (`need`), then that nothing else is there (`finish`).
  `what` is how a name is called in messages ("key" for safetensors, "parameter" for Orbax leaves);
  `where` names the checkpoint for a missing name."""

  def __init__(self, stored: Mapping[str, Stored], where: str, what: str = "key"):
    self.stored, self.where, self.what = stored, where, what
    self.seen: dict[str, Stored] = {}

  def has(self, name: str) -> bool:
    return name in self.stored

  def need(self, name: str, shape: Iterable[int], dtypes: Iterable[str]) -> Stored:
    """The stored entry of `name`, checked: present, of `shape`, with a dtype in `dtypes`."""
    if name not in self.stored:
      raise CheckpointError(f"{self.where}: {self.what} {name!r} missing from the checkpoint (the config implies it)")
    s = self.stored[name]
    shape, dtypes = tuple(shape), tuple(dtypes)
    if tuple(s.shape) != shape:
      raise CheckpointError(f"{s.location}: {self.what} {name!r} has shape {list(s.shape)}, the config implies "
                            f"{list(shape)}")
    if s.dtype not in dtypes:
      raise CheckpointError(f"{s.location}: {self.what} {name!r} has dtype {s.dtype}, expected one of "
                            f"{sorted(dtypes)}")
    self.seen[name] = s
    return s

  def need_all(self, expected: Mapping[str, tuple[Iterable[int], Iterable[str]]]) -> None:
    """`need` for every (name -> (shape, dtypes)) of `expected`, reporting the first missing name with the
    count of the others."""
    missing = sorted(n for n in expected if n not in self.stored)
    if missing:
      raise CheckpointError(f"{self.where}: {self.what} {missing[0]!r} missing from the checkpoint{_more(missing)} "
                            "(the config implies it)")
    for name, (shape, dtypes) in expected.items():
      self.need(name, shape, dtypes)

  def finish(self, ignore: Iterable[str] = (), why: str = "this config") -> None:
    """Raises on any stored name that was neither needed nor in `ignore`."""
    skip = set(ignore)
    extra = sorted(n for n in self.stored if n not in self.seen and n not in skip)
    if extra:
      raise CheckpointError(f"{self.stored[extra[0]].location}: unexpected {self.what} {extra[0]!r}{_more(extra)} "
                            f"for {why}")


def nonfinite(x: np.ndarray) -> tuple[int, int]:
  """(NaN count, inf count) of a float array (bfloat16 and FP8 included; 0, 0 for others), counted a few MB
  at a time: no full-size temporary."""
  try:
    ml_dtypes.finfo(x.dtype)
  except ValueError:
    return 0, 0
  if x.ndim == 0:
    x = x.reshape(1)
  rows = max(1, (4 << 20) // max(1, x[:1].size * 4))
  nan = inf = 0
  for i in range(0, x.shape[0], rows):
    c = np.asarray(x[i:i + rows], np.float32)
    nan, inf = nan + int(np.isnan(c).sum()), inf + int(np.isinf(c).sum())
  return nan, inf


def check_finite(x: np.ndarray, name: str, strict: bool = False, as_is: str = "loaded as they are") -> None:
  """Logs a warning naming the tensor (`name`: file and key) when it holds NaN or inf values (`as_is` says
  what happens to them); with `strict` refuses it (CheckpointError)."""
  nan, inf = nonfinite(x)
  if not nan and not inf:
    return
  msg = f"{name}: {nan} NaN and {inf} inf values (of {x.size})"
  if strict:
    raise CheckpointError(f"{msg}; refused (--strict)")
  log.warning("warning: %s; %s", msg, as_is)
