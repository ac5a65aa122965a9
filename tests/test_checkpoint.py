"""Orbax checkpoints: training state round trip, restore onto other meshes and dtypes, converted-model
helpers, slice-by-slice parameter files, and a save killed mid-way."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llama4_jax import config as C
from llama4_jax import load
from llama4_jax.io import checkpointer, model_dir, orbax_store, targets
from llama4_jax.model.llama4 import abstract, init

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = C.Llama4Config(text=C.TINY_SCOUT.text, vision=None, dtype="float32")


def mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


@pytest.fixture(scope="module")
def model():
  return init(CFG, C.FP32, seed=0)


def test_checkpointer_round_trip(model, tmp_path):
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  tx = optax.adamw(1e-3)
  opt = tx.init(pure)
  opt = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, opt)  # not all zeros
  with checkpointer.Checkpointer(tmp_path, keep=2) as c:
    for step in (10, 20, 30):
      assert c.save(step, state, opt, {"epoch": 0, "index": step}, {"loss": 1.5})
    c.wait()
    assert c.all_steps() == [20, 30] and c.latest_step() == 30
    assert sorted(os.listdir(tmp_path)) == ["20", "30"]
    graphdef, abs_state = nnx.split(abstract(CFG, C.FP32))
    r = c.restore(params_target=targets.abstract_target(abs_state), opt_target=opt)
    assert r["step"] == 30 and r["data_state"] == {"epoch": 0, "index": 30}
    assert r["meta"] == {"loss": 1.5, "step": 30}
    assert isinstance(r["params"], nnx.State)
    assert equal(nnx.to_pure_dict(r["params"]), pure)
    assert jax.tree.structure(r["opt_state"]) == jax.tree.structure(opt) and equal(r["opt_state"], opt)
    restored = nnx.merge(graphdef, r["params"])
    assert equal(nnx.to_pure_dict(nnx.state(restored)), pure)
    # Without targets: as saved, a pure dict (string layer keys) that replace_by_pure_dict accepts.
    r = c.restore(20)
    got = r["params"]["text"]["blocks"]["layers"]["0"]["attn"]["q"]
    assert got.shape == pure["text"]["blocks"]["layers"][0]["attn"]["q"].shape
    target = jax.tree.map(lambda x: x, abs_state)
    nnx.replace_by_pure_dict(target, r["params"])
    assert equal(nnx.to_pure_dict(target), pure)
    with pytest.raises(FileNotFoundError, match="step 10"):
      c.restore(10)
  with checkpointer.Checkpointer(tmp_path / "empty") as c:
    assert c.latest_step() is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
      c.restore()


def test_params_only_and_optional_items(tmp_path):
  with checkpointer.Checkpointer(tmp_path, async_save=False) as c:
    c.save(1, {"w": jnp.ones((4, 4))})
    r = c.restore()
  assert r["opt_state"] is None and r["data_state"] is None and r["meta"] == {"step": 1}
  assert r["params"]["w"].sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_restore_onto_other_meshes_and_dtype(tmp_path):
  rng = np.random.default_rng(0)
  host = {"a": rng.standard_normal((8, 16, 24), dtype=np.float32),
          "b": {"c": rng.standard_normal((32, 8), dtype=np.float32), "d": np.arange(6, dtype=np.int32)}}
  m42 = mesh((4, 2), ("x", "y"))
  specs = {"a": P("x", "y"), "b": {"c": P(("x", "y")), "d": P()}}
  saved = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(m42, s)), host, specs)
  with checkpointer.Checkpointer(tmp_path, async_save=False) as c:
    c.save(5, saved)
    for shape, names, tspecs in [((8,), ("data",), {"a": P(None, "data"), "b": {"c": P("data"), "d": P()}}),
                                 ((2, 4), ("p", "q"), {"a": P("q", None, "p"), "b": {"c": P(None, "q"), "d": P("p")}})]:
      m = mesh(shape, names)
      target = jax.tree.map(lambda x, s, m=m: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(m, s)),
                            host, tspecs)
      got = c.restore(params_target=target)["params"]
      for x, t, h in zip(jax.tree.leaves(got), jax.tree.leaves(target), jax.tree.leaves(host)):
        assert x.sharding == t.sharding and x.dtype == h.dtype
        np.testing.assert_array_equal(np.asarray(x), h)  # bit-exact
        for shard in x.addressable_shards:
          np.testing.assert_array_equal(np.asarray(shard.data), h[shard.index])
    m = mesh((8,), ("data",))
    target = targets.abstract_target(host, jax.tree.map(lambda _: NamedSharding(m, P()), host), dtype=jnp.bfloat16)
    got = c.restore(params_target=target)["params"]
  assert got["a"].dtype == jnp.bfloat16 and got["b"]["d"].dtype == jnp.int32  # only floats are cast
  np.testing.assert_array_equal(np.asarray(got["a"]), host["a"].astype(ml_dtypes.bfloat16))


def test_save_params_and_load(model, tmp_path):
  state = nnx.state(model)
  d = model_dir.save_params(tmp_path / "m", state, CFG)
  assert sorted(os.listdir(d)) == ["config.json", "llama4_jax.json", "params"]
  loaded = load(d).model
  assert equal(nnx.to_pure_dict(nnx.state(loaded)), nnx.to_pure_dict(state))
  m8 = mesh((8,), ("data",))
  abs_state = nnx.state(abstract(CFG, C.FP32))
  shardings = jax.tree.map(lambda x: NamedSharding(m8, P("data") if x.shape[0] % 8 == 0 else P()), abs_state)
  restored = model_dir.restore_params(d, targets.abstract_target(abs_state, shardings))
  assert isinstance(restored, nnx.State)
  assert restored["text"]["embed"].get_value().sharding == NamedSharding(m8, P("data"))
  with pytest.raises(FileExistsError):
    model_dir.save_params(d, state)
  assert [e for e in os.listdir(tmp_path) if e.startswith(".")] == []


def test_param_writer_slices_restore_with_orbax(tmp_path):
  rng = np.random.default_rng(1)
  stacked = rng.standard_normal((4, 5, 40, 24), dtype=np.float32)
  flat = rng.standard_normal((24, 40), dtype=np.float32).astype(ml_dtypes.bfloat16)
  d = str(tmp_path / "params")
  w = orbax_store.ParamWriter(d, chunk_bytes=4096)
  w.create(("s", 0, "x"), stacked.shape, np.float32, stacked=True)
  w.create(("f",), (40, 24), ml_dtypes.bfloat16)
  assert w._leaves[("s", 0, "x")]["chunks"] == (1, 1, 40, 24)  # one chunk per (block, row): many pieces
  for b in (2, 0, 3, 1):
    w.write(("s", 0, "x"), np.swapaxes(np.swapaxes(stacked[b], 0, 2).copy(), 0, 2), b)  # strided views
  with pytest.raises(ValueError, match="written twice"):
    w.write(("s", 0, "x"), stacked[0], 0)
  w.write(("f",), flat.T)
  w.finish()
  m = mesh((2, 4), ("p", "q"))
  spec = NamedSharding(m, P("p", None, "q"))
  target = {"s": {0: {"x": jax.ShapeDtypeStruct(stacked.shape, jnp.float32, sharding=spec)}},
            "f": jax.ShapeDtypeStruct((40, 24), jnp.bfloat16, sharding=NamedSharding(m, P("q")))}
  got = model_dir.restore_params(d, target)
  np.testing.assert_array_equal(np.asarray(got["s"][0]["x"]), stacked)
  np.testing.assert_array_equal(np.asarray(got["f"]), flat.T)
  r = orbax_store.ParamReader(d)
  np.testing.assert_array_equal(r.read(("s", 0, "x"), 1), stacked[1])
  np.testing.assert_array_equal(r.read(("f",), dtype=np.float32), flat.T.astype(np.float32))
  w = orbax_store.ParamWriter(str(tmp_path / "incomplete"))
  w.create(("s",), (2, 3), np.float32, stacked=True)
  w.write(("s",), np.zeros(3, np.float32), 0)
  with pytest.raises(ValueError, match=r"s: slices \[1\] never written"):
    w.finish()


def test_chunk_shape_bounds_chunks():
  assert orbax_store.chunk_shape((12, 16, 5120, 2, 8192), 2, True, 8 << 20) == (1, 1, 256, 2, 8192)  # 8 MiB
  assert orbax_store.chunk_shape((202048, 5120), 2, False, 8 << 20) == (819, 5120)
  assert orbax_store.chunk_shape((5120,), 2, False, 8 << 20) == (5120,)
  assert orbax_store.chunk_shape((4, 64), 4, True, 8 << 20) == (1, 64)


_SAVER = textwrap.dedent("""
    import sys
    import jax.numpy as jnp
    import numpy as np
    from llama4_jax.io.checkpointer import Checkpointer
    c = Checkpointer(sys.argv[1])
    c.save(1, {"w": np.arange(1000, dtype=np.float32)}, data_state={"i": 1})
    c.wait()
    print("SAVED", flush=True)
    big = {f"w{i}": jnp.full((1024, 1024, 4), i, jnp.float32) for i in range(24)}  # 384 MB
    c.save(2, big, data_state={"i": 2})
    c.wait()
    print("DONE", flush=True)
""")


def test_save_killed_mid_way_keeps_the_last_checkpoint(tmp_path):
  d = tmp_path / "run"
  p = subprocess.Popen([sys.executable, "-c", _SAVER, str(d)], stdout=subprocess.PIPE, cwd=ROOT)
  try:
    assert p.stdout.readline().strip() == b"SAVED"
    deadline = time.time() + 120
    while not any(e.startswith("2.") for e in os.listdir(d)):  # step 2's temporary directory
      assert time.time() < deadline and p.poll() is None
      time.sleep(0.002)
  finally:
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
  assert "2" not in os.listdir(d)
  with checkpointer.Checkpointer(d) as c:
    assert c.all_steps() == [1]
    r = c.restore()
  assert r["step"] == 1 and r["data_state"] == {"i": 1}
  np.testing.assert_array_equal(np.asarray(r["params"]["w"]), np.arange(1000, dtype=np.float32))
  assert sorted(os.listdir(d)) == ["1"]  # the interrupted save's leftovers are cleaned up
