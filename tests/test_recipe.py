import pytest
import yaml

from quantkit.errors import RecipeError
from quantkit.hf.config import QuantkitConfig
from quantkit.recipe import Recipe, list_presets, load_recipe, matches
from quantkit.scheme import LayerScheme

NAMES = [f"model.layers.{i}.{m}" for i in range(2) for m in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_presets_exist_and_validate():
    presets = list_presets()
    for name in ("rtn-w4g128", "gptq-w4g128", "gptq-w3g128", "gptq-w2g64", "gptq-w8"):
        assert name in presets
    for name in presets:
        r = load_recipe(name)
        assert r.name == name and r.description
        assert set(r.resolve(NAMES)) == set(NAMES)
    assert load_recipe("gptq-w8").schemes[0].scheme.group_size == -1
    assert load_recipe("gptq-w2g64").schemes[0].scheme.bits == 2


def test_recipe_round_trip(tmp_path):
    r = load_recipe("gptq-w3g128")
    assert Recipe.from_dict(r.to_dict()) == r
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r.to_dict()))
    assert load_recipe(p) == r


def test_scheme_and_config_round_trip():
    s = LayerScheme("gptq", 3, 64, symmetric=True, act_order=True, static_groups=True, damp=0.05, block_size=32)
    assert LayerScheme.from_dict(s.to_dict()) == s
    cfg = QuantkitConfig(modules={"model.layers.0.mlp.up_proj": s.to_dict()}, recipe="x")
    back = QuantkitConfig.from_dict(cfg.to_dict())
    assert back.to_dict() == cfg.to_dict()
    assert back.schemes() == {"model.layers.0.mlp.up_proj": s}


def test_targets_ignore_and_first_match():
    r = Recipe.from_dict({
        "ignore": ["re:model\\.layers\\.1\\..*"],
        "schemes": [
            {"targets": ["down_proj"], "method": "rtn", "bits": 8, "group_size": -1},
            {"targets": ["re:.*_proj"], "method": "gptq", "bits": 4},
        ],
    })
    s = r.resolve(NAMES)
    assert set(s) == {n for n in NAMES if ".layers.0." in n}
    assert s["model.layers.0.mlp.down_proj"].bits == 8
    assert s["model.layers.0.self_attn.q_proj"].method == "gptq"
    assert matches("model.layers.0.mlp.up_proj", "up_proj") and not matches("model.layers.0.mlp.up_proj", "p_proj")


@pytest.mark.parametrize("doc,msg", [
    ({"schemes": [{"method": "gptq", "bits": 4, "groupsize": 128}]}, "unknown field 'groupsize'"),
    ({"schemes": [{"method": "gptq", "bits": 5}]}, "field 'bits': unsupported bit width"),
    ({"schemes": [{"method": "gtpq", "bits": 4}]}, "field 'method': unknown method"),
    ({"schemes": [{"method": "gptq", "bits": 4, "group_size": 0}]}, "field 'group_size'"),
    ({"schemes": [{"method": "gptq", "bits": 4, "damp": 2}]}, "field 'damp'"),
    ({"schemes": [{"method": "gptq", "bits": 4, "act_order": "yes"}]}, "field 'act_order'"),
    ({"schemes": [{"bits": 4}]}, "missing required field 'method'"),
    ({"schemes": []}, "'schemes' must be a non-empty list"),
    ({"scheme": []}, "unknown field 'scheme'"),
    ({"schemes": [{"targets": ["re:("], "method": "rtn", "bits": 4}]}, "bad regex"),
])
def test_bad_recipes_name_the_field(doc, msg):
    with pytest.raises(RecipeError, match=msg):
        Recipe.from_dict(doc)


def test_unknown_preset_and_unmatched_targets(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'nope'.*presets are"):
        load_recipe("nope")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    r = Recipe.from_dict({"schemes": [{"targets": ["qkv_proj"], "method": "rtn", "bits": 4}]})
    with pytest.raises(RecipeError, match="match no linear"):
        r.resolve(NAMES)
    with pytest.raises(NotImplementedError, match="lm_head"):
        Recipe.from_dict({"schemes": [{"targets": ["lm_head"], "method": "rtn", "bits": 4}]})
