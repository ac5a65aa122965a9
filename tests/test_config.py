"""Config: both config.json spellings, to_hf round trip through transformers, presets, clear errors."""

import dataclasses
import json
import os

import pytest
import transformers

from llama4_jax import config as C

# The release config.json files of Llama-4-Scout-17B-16E-Instruct and Llama-4-Maverick-17B-128E-Instruct
# (4.51 spelling), kept with the tests so that CI checks the presets against them.
RELEASE = os.path.join(os.path.dirname(__file__), "data", "release_configs")


def _release(name):
  return os.path.join(RELEASE, name)


@pytest.mark.parametrize("name,preset", [("scout_instruct_config.json", C.SCOUT),
                                         ("maverick_instruct_config.json", C.MAVERICK)])
def test_release_configs_match_presets(name, preset):
  cfg = C.from_hf(_release(name))
  assert cfg == preset
  # 4.51 spelling facts: stored `no_rope_layers: []` materialises to every 4th layer NoPE.
  assert [i for i in range(48) if not cfg.text.use_rope(i)] == list(range(3, 48, 4))
  assert cfg.text.layer_period == 4


def test_scout_and_maverick_layouts():
  s, m = C.SCOUT.text, C.MAVERICK.text
  assert s.moe_layers == tuple(range(48)) and s.use_qk_norm
  assert s.rope_scaling == C.RopeScaling(16.0, 1.0, 1.0, 8192)
  assert m.moe_layers == tuple(range(1, 48, 2)) and not m.use_qk_norm and m.rope_scaling is None
  assert m.layer_types[:4] == ("chunked_attention",) * 3 + ("full_attention",)


def _hf_text_dict(cfg: transformers.PretrainedConfig) -> dict:
  d = cfg.to_dict()
  for k in ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "output_attentions",
            "output_hidden_states", "return_dict", "use_return_dict"):
    d.pop(k, None)
  return d


@pytest.mark.parametrize("preset", [C.SCOUT, C.MAVERICK, C.TINY_SCOUT, C.TINY_MAVERICK])
@pytest.mark.parametrize("legacy", [False, True])
def test_to_hf_loads_identically_in_transformers(preset, legacy, tmp_path):
  C.save_hf(preset, tmp_path, legacy=legacy)
  ours = transformers.AutoConfig.from_pretrained(tmp_path)
  # Reference: transformers' own config with the same values, saved by transformers and read back.
  assert isinstance(ours, transformers.Llama4Config)
  assert C.from_hf(tmp_path) == preset
  ours.save_pretrained(tmp_path / "resaved")
  assert C.from_hf(tmp_path / "resaved") == preset  # transformers' 5.x spelling reads back identically
  assert _hf_text_dict(ours.text_config) == _hf_text_dict(
      transformers.AutoConfig.from_pretrained(tmp_path / "resaved").text_config)


def test_release_json_and_ours_agree_in_transformers(tmp_path):
  # transformers reads the release file (4.51 spelling) ...
  release_dir = tmp_path / "release"
  release_dir.mkdir()
  with open(_release("scout_instruct_config.json")) as f:
    (release_dir / "config.json").write_text(f.read())
  ref = transformers.AutoConfig.from_pretrained(release_dir)
  # ... and ours, written from the preset, gives the same text and vision configs.
  C.save_hf(C.SCOUT, tmp_path)
  ours = transformers.AutoConfig.from_pretrained(tmp_path)
  assert _hf_text_dict(ours.text_config) == _hf_text_dict(ref.text_config)
  assert _hf_text_dict(ours.vision_config) == _hf_text_dict(ref.vision_config)


def test_text_only_causal_lm_config(tmp_path):
  text_only = dataclasses.replace(C.TINY_MAVERICK, vision=None)
  d = C.to_hf(text_only)
  assert d["model_type"] == "llama4_text" and d["architectures"] == ["Llama4ForCausalLM"]
  C.save_hf(text_only, tmp_path)
  assert isinstance(transformers.AutoConfig.from_pretrained(tmp_path), transformers.Llama4TextConfig)
  back = C.from_hf(tmp_path)
  assert back.vision is None and back.text == text_only.text  # image token ids are not part of a text config


def test_int_temperature_tuning_flag_is_read_as_bool():
  d = C.to_hf(C.TINY_SCOUT, legacy=True)
  d["text_config"]["attn_temperature_tuning"] = 4
  assert C.from_hf(d).text.attn_temperature_tuning is True


@pytest.mark.parametrize("mutate,field", [
    (lambda d: d.update(model_type="llama3"), "model_type"),
    (lambda d: d["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda d: d["text_config"].update(no_rope_layers=[1, 0]), "no_rope_layers"),
    (lambda d: d["text_config"].update(head_dim=15), "head_dim"),
    (lambda d: d["text_config"].update(num_experts_per_tok=9), "num_experts_per_tok"),
    (lambda d: d["text_config"].update(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling"),
    (lambda d: d["vision_config"].update(num_attention_heads=5), "num_attention_heads"),
    (lambda d: d["vision_config"].update(intermediate_size=100), "intermediate_size"),
    (lambda d: d["vision_config"].update(projector_input_dim=7), "projector_input_dim"),
])
def test_bad_configs_name_the_field(mutate, field, tmp_path):
  d = C.to_hf(C.TINY_SCOUT, legacy=True)
  mutate(d)
  path = tmp_path / "config.json"
  path.write_text(json.dumps(d))
  with pytest.raises(C.ConfigError, match=field) as e:
    C.from_hf(path)
  assert str(path) in str(e.value)


def test_missing_or_corrupt_config_file(tmp_path):
  with pytest.raises(C.ConfigError, match="no config.json"):
    C.from_hf(tmp_path)
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(C.ConfigError, match="not valid JSON"):
    C.from_hf(tmp_path)
