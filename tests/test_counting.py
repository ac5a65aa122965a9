"""Real-size models built abstractly (no allocation) in seconds, with the published parameter counts."""

import pytest

from llama4_jax import config as C
from llama4_jax.model.counting import count_params


@pytest.mark.parametrize("cfg,total,text,active", [
    (C.SCOUT, 108.64e9, 107.77e9, 17.17e9),
    (C.MAVERICK, 401.58e9, 400.71e9, 17.19e9),
])
def test_real_parameter_counts(cfg, total, text, active):
  n = count_params(cfg, C.BF16)  # abstract: this whole test takes seconds
  assert n.text == pytest.approx(text, rel=1e-3)
  assert n.active == pytest.approx(active, rel=1e-3)
  if n.vision:  # with the vision tower and projector
    assert n.vision == pytest.approx(0.87e9, rel=1e-2)
    assert n.total == pytest.approx(total, rel=1e-3)
