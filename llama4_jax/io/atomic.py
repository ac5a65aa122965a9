"""Atomic outputs: a directory (or small file) appears at its destination only once complete.

`atomic_dir(dst)` yields a fresh temporary sibling `.NAME.tmp-PID-XXXXXXXX`; when the block completes it is
renamed to `dst` (an existing `dst` is replaced only with `overwrite=True`, and only after the new one is
complete: the old one is moved aside to `.NAME.old-PID-XXXXXXXX` first and removed after). If the block
raises, the temporary directory is removed. Leftovers of a killed process (its PID is gone) are removed by
the next `atomic_dir` of the same destination, except a moved-aside old destination whose replacement never
arrived, which is kept and logged. `writing(dst, what)` turns write failures (a full disk, an I/O error)
into a `WriteError` naming the destination and what was being written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import uuid
from typing import Iterator

from llama4_jax.io.validate import CheckpointError

log = logging.getLogger(__name__)


class WriteError(RuntimeError):
  """An output that cannot be written (disk full, I/O error); the message names it."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove(path: str) -> None:
  """Removes a file, a symlink or a directory tree, if present."""
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


def _clean_stale(parent: str, name: str, dst: str) -> None:
  """Temporary directories of killed writers of `dst` (their process is gone)."""
  pat = re.compile(rf"^\.{re.escape(name)}\.(tmp|old)-(\d+)-[0-9a-f]{{8}}$")
  for entry in os.listdir(parent):
    m = pat.match(entry)
    if not m or _pid_alive(int(m.group(2))):
      continue
    if m.group(1) == "old" and not os.path.lexists(dst):
      log.warning("%s: kept %s (the previous destination; the replacement was interrupted)", dst, entry)
      continue
    log.info("removing %s left by an interrupted write", os.path.join(parent, entry))
    remove(os.path.join(parent, entry))


def fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
  """Yields a fresh temporary directory next to `dst`; renamed to `dst` when the block completes, removed
  if it raises. FileExistsError if `dst` exists and not `overwrite`."""
  dst = os.path.abspath(os.fspath(dst))
  parent, name = os.path.split(dst)
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"{dst}: destination exists (pass --overwrite to replace it)")
  os.makedirs(parent, exist_ok=True)
  _clean_stale(parent, name, dst)
  tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp = os.path.join(parent, f".{name}.tmp-{tag}")
  os.mkdir(tmp)
  try:
    yield tmp
    with writing(dst, "the final rename"):
      fsync_dir(tmp)
      if os.path.lexists(dst):
        old = os.path.join(parent, f".{name}.old-{tag}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        remove(old)
      else:
        os.rename(tmp, dst)
      fsync_dir(parent)
  except BaseException:
    remove(tmp)
    raise


@contextlib.contextmanager
def writing(dst: str, what: str) -> Iterator[None]:
  """Turns write failures into WriteError naming the destination and what was being written."""
  try:
    yield
  except (CheckpointError, WriteError, FileExistsError):
    raise
  except Exception as e:  # OSError from files; tensorstore reports I/O errors as ValueError
    full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e)
    reason = "no space left on device" if full else f"{type(e).__name__}: {e}"
    raise WriteError(f"{dst}: writing {what} failed: {reason}") from e
