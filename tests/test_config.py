"""Config: both config.json spellings, to_hf round trip through transformers, presets, clear errors."""

import dataclasses
import json
import os

import pytest
import transformers

from llama4_jax import config as C
from llama4_jax.train import config as tc

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
  # 4.51 spelling facts: `no_rope_layers: []` is stored as () and resolves to every 4th layer NoPE.
  assert cfg.text.no_rope_layers == () and cfg.text.moe_layers is None
  assert [i for i in range(48) if not cfg.text.use_rope(i)] == list(range(3, 48, 4))
  assert cfg.text.layer_period == 4


def test_scout_and_maverick_layouts():
  s, m = C.SCOUT.text, C.MAVERICK.text
  assert s.moe_layer_ids == tuple(range(48)) and s.use_qk_norm
  assert s.rope_scaling == C.RopeScaling(16.0, 1.0, 1.0, 8192)
  assert m.moe_layer_ids == tuple(range(1, 48, 2)) and not m.use_qk_norm and m.rope_scaling is None
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


# --------------------------------------------------------------------------------------------------
# The dataclasses store what they are given; the layout is derived


def test_fields_hold_what_was_passed():
  kw = dict(num_hidden_layers=6, no_rope_layer_interval=3, interleave_moe_layer_step=2, eos_token_id=(7,),
            rope_scaling=None, pad_token_id=None)
  t = dataclasses.replace(C.TINY_SCOUT.text, **kw)
  stored = {f.name: getattr(t, f.name) for f in dataclasses.fields(t)}
  assert stored == {**{f.name: getattr(C.TINY_SCOUT.text, f.name) for f in dataclasses.fields(t)}, **kw}
  assert t.no_rope_layers == () and t.moe_layers is None  # the defaults stay defaults ...
  assert t.rope_flags == (1, 1, 0, 1, 1, 0) and t.moe_layer_ids == (1, 3, 5)  # ... and resolve here
  assert t.layer_types[2] == "full_attention" and t.layer_kinds[:2] == ((True, False), (True, True))
  assert t.layer_period == 6 and not t.use_rope(5) and t.is_moe(5) and not t.is_moe(4)
  explicit = dataclasses.replace(t, no_rope_layers=(1, 0) * 3, moe_layers=())
  assert explicit.no_rope_layers == (1, 0) * 3 and explicit.moe_layers == ()  # () is "no MoE layer", not None
  assert explicit.moe_layer_ids == () and explicit.layer_period == 2


def test_changing_the_depth_rederives_the_default_layout():
  t = dataclasses.replace(C.MAVERICK.text, num_hidden_layers=8)
  assert t.rope_flags == (1, 1, 1, 0) * 2 and t.moe_layer_ids == (1, 3, 5, 7) and t.layer_period == 4
  with pytest.raises(C.ConfigError, match="no_rope_layers.*3 entries for num_hidden_layers=8"):
    dataclasses.replace(C.TINY_SCOUT.text, no_rope_layers=(1, 1, 0), num_hidden_layers=8)


@pytest.mark.parametrize("name", sorted(C.PRESETS))
@pytest.mark.parametrize("legacy", [False, True])
def test_presets_round_trip_through_hf_dicts(name, legacy):
  preset = C.PRESETS[name]
  d = C.to_hf(preset, legacy)
  text = d["text_config"]
  L = preset.text.num_hidden_layers
  assert text["no_rope_layers"] == list(preset.text.rope_flags) and len(text["no_rope_layers"]) == L
  assert text["moe_layers"] == list(preset.text.moe_layer_ids) and text["eos_token_id"] == list(
      preset.text.eos_token_id)
  assert C.from_hf(json.loads(json.dumps(d))) == preset


def test_5x_config_with_explicit_lists():
  d = C.to_hf(C.TINY_SCOUT)  # 5.x spelling: rope_parameters, dtype, materialised lists, layer_types
  assert "rope_parameters" in d["text_config"] and "layer_types" in d["text_config"]
  d["text_config"].update(no_rope_layers=[1, 0, 1, 0], moe_layers=[0, 3], eos_token_id=5, rope_theta=10000)
  t = C.from_hf(json.loads(json.dumps(d))).text
  assert t.no_rope_layers == (1, 0, 1, 0) and t.moe_layers == (0, 3) and t.eos_token_id == (5,)
  assert t.layer_kinds == ((True, True), (False, False), (True, False), (False, True))
  assert isinstance(t.rope_scaling, C.RopeScaling) and isinstance(t.rope_theta, float)
  back = C.to_hf(C.Llama4Config(text=t, vision=None))
  assert back["no_rope_layers"] == [1, 0, 1, 0] and back["moe_layers"] == [0, 3]
  # a materialised list equal to the default pattern reads back as the default
  d["text_config"].update(no_rope_layers=[1, 1, 1, 0], moe_layers=[0, 1, 2, 3])
  t = C.from_hf(d).text
  assert t.no_rope_layers == () and t.moe_layers is None


@pytest.mark.parametrize("make,field", [
    (lambda: C.TextConfig(eos_token_id=[1, 2]), "text_config.eos_token_id"),
    (lambda: C.TextConfig(eos_token_id=1), "text_config.eos_token_id"),
    (lambda: C.TextConfig(no_rope_layers=[1] * 48), "text_config.no_rope_layers"),
    (lambda: C.TextConfig(moe_layers=[0, 1]), "text_config.moe_layers"),
    (lambda: C.TextConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "text_config.rope_scaling"),
    (lambda: C.TextConfig(hidden_size="5120"), "text_config.hidden_size"),
    (lambda: C.TextConfig(num_hidden_layers=True), "text_config.num_hidden_layers"),
    (lambda: C.TextConfig(use_qk_norm=1), "text_config.use_qk_norm"),
    (lambda: C.TextConfig(pad_token_id=1.0), "text_config.pad_token_id"),
    (lambda: C.RopeScaling(factor="16"), "text_config.rope_scaling.factor"),
    (lambda: C.VisionConfig(patch_size=14.0), "vision_config.patch_size"),
    (lambda: C.Llama4Config(text={"hidden_size": 64}), "text"),
    (lambda: C.Llama4Config(vision=False), "vision"),
    (lambda: C.Policy(moe_block="128"), "policy.moe_block"),
])
def test_wrong_types_are_rejected_naming_the_field(make, field):
  with pytest.raises(C.ConfigError, match=f"config field '{field}': expected "):
    make()


def test_ints_are_accepted_for_float_fields_and_scaling_is_llama3():
  assert C.TextConfig(rope_theta=10000).rope_theta == 10000
  with pytest.raises(C.ConfigError, match="'text_config.rope_scaling.rope_type': only 'llama3'"):
    C.RopeScaling(rope_type="yarn")


# --------------------------------------------------------------------------------------------------
# `--set` overrides, parsed against the field types


EXP = tc.Experiment(name="t", model=C.TINY_SCOUT)


def _set(*assignments):
  return tc.apply_overrides(EXP, list(assignments))


def test_set_parses_scalars_by_field_type():
  e = _set("optim.lr=2e-3", "optim.warmup_steps=7", "run.peak_flops=1", "moe.bias_balancing=on",
           "mesh.distributed=yes", "run.freeze_vision=0", "run.sample_prompt= a b ", "name=x1", "rules=fsdp_tp")
  assert e.optim.lr == 2e-3 and e.optim.warmup_steps == 7 and e.run.peak_flops == 1.0
  assert isinstance(e.run.peak_flops, float) and e.moe.bias_balancing is True and e.mesh.distributed is True
  assert e.run.freeze_vision is False and e.run.sample_prompt == " a b " and e.name == "x1" and e.rules == "fsdp_tp"
  assert _set("run.init_from=none").run.init_from == "none"  # a str field is not optional


def test_set_parses_optionals_and_tuples():
  e = _set("model.text.pad_token_id=none", "model.text.bos_token_id=null", "model.text.eos_token_id=4",
           "data.train_paths=a.txt, b.txt", "data.val_paths=", "model.text.moe_layers=0,2",
           "model.text.no_rope_layers=1,0,1,0")
  t = e.model.text
  assert t.pad_token_id is None and t.bos_token_id is None and t.eos_token_id == (4,)
  assert e.data.train_paths == ("a.txt", "b.txt") and e.data.val_paths == ()
  assert t.moe_layers == (0, 2) and t.no_rope_layers == (1, 0, 1, 0)
  assert _set("model.text.moe_layers=none").model.text.moe_layers is None
  assert _set("model.text.moe_layers=").model.text.moe_layer_ids == ()


def test_set_depth_rederives_the_layer_pattern():
  t = _set("model.text.num_hidden_layers=8").model.text
  assert t.rope_flags == (1, 1, 1, 0) * 2 and t.moe_layer_ids == tuple(range(8)) and t.layer_period == 4
  t = _set("model=tiny-maverick", "model.text.num_hidden_layers=8").model.text
  assert t.moe_layer_ids == (1, 3, 5, 7) and t.layer_period == 4


def test_set_nested_dataclasses_and_presets():
  assert _set("model=tiny-maverick").model == C.TINY_MAVERICK
  assert _set("model.vision=none").model.vision is None
  assert _set("model.vision=none", "model.vision.num_hidden_layers=3").model.vision == C.VisionConfig(
      num_hidden_layers=3)  # a None dataclass starts from its defaults
  e = _set("model.text.rope_scaling=none", "model.text.rope_scaling.factor=4")
  assert e.model.text.rope_scaling == C.RopeScaling(factor=4.0)
  assert _set("model.text.rope_scaling.factor=4").model.text.rope_scaling.low_freq_factor == 1.0  # kept
  assert _set("mesh.fsdp=2", "mesh.tensor=4").mesh == tc.MeshConfig(fsdp=2, tensor=4)


@pytest.mark.parametrize("assignment,message", [
    ("optim.lrr=1", r"--set optim.lrr=1: OptimConfig has no field 'lrr' .*valid fields: lr, min_lr_ratio, "),
    ("mesh.axis_types=explicit,explicit",
     r"MeshConfig has no field 'axis_types' "
     r".*valid fields: data, fsdp, expert, context, tensor, dcn_data, distributed"),
    ("model.text.heads=4", r"TextConfig has no field 'heads' \(model.text.heads\).*num_attention_heads"),
    ("run.steps=many", r"--set run.steps=many: field 'run.steps' expects int, got 'many'"),
    ("optim.lr=fast", r"field 'optim.lr' expects float, got 'fast'"),
    ("moe.bias_balancing=maybe", r"field 'moe.bias_balancing' expects bool \(true/false"),
    ("model.text.pad_token_id=x", r"field 'model.text.pad_token_id' expects int \| None, got 'x'"),
    ("model.text.moe_layers=0,x", r"field 'model.text.moe_layers' expects tuple\[int, ...\] \| None \(comma"),
    ("optim.lr=none", r"field 'optim.lr' expects float, got 'none'"),
    ("model=huge", r"field 'model' expects a preset name \(scout, maverick, tiny-scout, tiny-maverick\)"),
    ("model.text=small", r"field 'model.text' is a TextConfig; set its fields as model.text.<field>=value"),
    ("optim.lr.x=1", r"field 'optim.lr' has type float, not a dataclass with field 'x'"),
    ("model.text.head_dim=15", r"--set model.text.head_dim=15: config field 'text_config.head_dim': must be even"),
    ("mesh.fsdp=0", r"--set mesh.fsdp=0: mesh sizes must be positive"),
    ("optim.lr", r"expected field=value"),
])
def test_set_errors_name_the_assignment_field_and_type(assignment, message):
  with pytest.raises(tc.OverrideError, match=message):
    tc.override(EXP, assignment)
