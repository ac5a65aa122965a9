"""`io.orbax_store` hand-writes Orbax's parameter layout: these tests fail loudly when an Orbax upgrade changes
the format (the metadata files differ from what Orbax writes, or either side can no longer read the other)."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp

from llama4_jax.io import orbax_store

RNG = np.random.default_rng(3)
TREE = {"text": {"blocks": {"0": {"w": RNG.standard_normal((3, 4, 6), dtype=np.float32)}},
                 "embed": RNG.standard_normal((10, 4), dtype=np.float32).astype(ml_dtypes.bfloat16)},
        "scale": RNG.standard_normal((7,), dtype=np.float32).astype(ml_dtypes.float8_e4m3fn)}
LEAVES = {("text", "blocks", "0", "w"): True, ("text", "embed"): False, ("scale",): False}  # path: stacked


def _leaf(path):
  x = TREE
  for k in path:
    x = x[k]
  return x


def _orbax_save(d):
  with ocp.StandardCheckpointer() as ck:
    ck.save(d, jax.tree.map(jnp.asarray, TREE))
    ck.wait_until_finished()


def _ours(d, stacked_write_shape=False):
  w = orbax_store.ParamWriter(d)
  for path, stacked in LEAVES.items():
    x = _leaf(path)
    stacked = stacked and stacked_write_shape
    w.create(path, x.shape, x.dtype, stacked=stacked)
    if stacked:
      for b in range(x.shape[0]):
        w.write(path, x[b], b)
    else:
      w.write(path, x)
  w.finish()


def _json(d, name):
  with open(os.path.join(d, name)) as f:
    return json.load(f)


def test_metadata_files_are_orbaxs(tmp_path):
  ref, ours = str(tmp_path / "ref"), str(tmp_path / "ours")
  _orbax_save(ref)
  _ours(ours)
  assert _json(ours, orbax_store.METADATA) == _json(ref, orbax_store.METADATA)
  a, b = _json(ours, orbax_store.CHECKPOINT_METADATA), _json(ref, orbax_store.CHECKPOINT_METADATA)
  assert set(a) == set(b) and a["item_handlers"] == b["item_handlers"] == orbax_store.STANDARD_HANDLER
  assert orbax_store.is_params_dir(ours) and orbax_store.is_params_dir(ref)


def test_orbax_reads_ours_and_we_read_orbaxs(tmp_path):
  ref, ours = str(tmp_path / "ref"), str(tmp_path / "ours")
  _orbax_save(ref)
  _ours(ours, stacked_write_shape=True)  # the converter's layout: one write per block of a stacked leaf
  with ocp.StandardCheckpointer() as ck:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), TREE)
    got = ck.restore(ours, target)
  for path in LEAVES:
    x = got
    for k in path:
      x = x[k]
    assert np.asarray(x).tobytes() == _leaf(path).tobytes(), path
  r = orbax_store.ParamReader(ref)
  assert set(r.paths) == set(LEAVES)
  for path, stacked in LEAVES.items():
    assert r.read(path).tobytes() == _leaf(path).tobytes(), path
    assert r.shape_dtype(path) == (_leaf(path).shape, _leaf(path).dtype)
    if stacked:
      assert r.read(path, 2).tobytes() == _leaf(path)[2].tobytes()
  stored = r.stored()
  assert stored["text.embed"].dtype == "bfloat16" and stored["scale"].shape == (7,)
