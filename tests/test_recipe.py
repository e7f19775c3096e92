import pytest
import yaml

from quantkit.config import LayerScheme, Recipe, list_presets, load_recipe, matches, save_recipe
from quantkit.errors import QuantkitError, RecipeError
from quantkit.hf.config import QuantkitConfig

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
        assert set(r.resolve(NAMES)) == (set(NAMES) if r.schemes else set())  # KV-only presets: no linear
        assert r.schemes or r.kv_cache is not None
    assert load_recipe("gptq-w8").schemes[0].scheme.quantizer.group_size == -1
    assert load_recipe("gptq-w2g64").schemes[0].scheme.quantizer.bits == 2


@pytest.mark.parametrize("name", list_presets())
def test_recipe_round_trip(tmp_path, name):
    r = load_recipe(name)
    assert Recipe.from_dict(r.to_dict()) == r
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r.to_dict()))
    assert load_recipe(p) == r
    save_recipe(r, tmp_path / "saved.yaml")
    assert load_recipe(tmp_path / "saved.yaml") == r
    assert r.to_dict()["version"] == 1 and all(s.to_dict()["version"] == 1 for s in r.schemes)


FLAT = dict(method="gptq", bits=3, group_size=64, symmetric=True, act_order=True, static_groups=True, damp=0.05,
            block_size=32, rotation="hadamard", rotate_output=True, rotation_seed=7)


def test_scheme_parts_flat_and_canonical_forms_agree():
    s = LayerScheme.from_dict(FLAT)
    assert s.method.name == "gptq" and s.method.damp == 0.05 and s.method.block_size == 32
    assert s.quantizer.name == "uniform" and s.quantizer.bits == 3 and s.quantizer.symmetric
    assert s.rotation.kind == "hadamard" and s.rotation.output and s.rotation.seed == 7
    assert s.format == "quantkit-uniform"
    d = s.to_dict()
    assert set(d) == {"version", "rotation", "method", "quantizer", "format"}
    assert d["rotation"] == {"kind": "hadamard", "output": True, "seed": 7}
    assert LayerScheme.from_dict(d) == s
    assert LayerScheme.from_dict(yaml.safe_load(yaml.safe_dump(d))) == s


@pytest.mark.parametrize("doc,msg", [
    ({"method": {"name": "gptq", "dmp": 0.1}, "quantizer": {"name": "uniform", "bits": 4}}, "unknown field 'dmp'"),
    ({"method": {"name": "gptq"}, "quantizer": {"name": "uniform", "bits": 5}}, "field 'quantizer.bits'"),
    ({"method": {"name": "gptq"}, "quantizer": {"name": "lattice", "bits": 4}}, "field 'quantizer.name'"),
    ({"method": {"name": "gptq"}, "quantizer": {"name": "uniform"}}, "field 'quantizer.bits': is required"),
    ({"method": {"name": "gptq"}, "quantizer": {"name": "uniform", "bits": 4}, "rotation": {"kind": "givens"}},
     "field 'rotation.kind'"),
    ({"method": {"name": "rtn", "act_order": True}, "quantizer": {"name": "uniform", "bits": 4}},
     "field 'method.act_order': applies to methods that use a Hessian"),
    ({"method": {"name": "gptq"}, "quantizer": {"name": "uniform", "bits": 4}, "format": "gguf"}, "field 'format'"),
    ({"method": {"name": "gptq"}, "quantizer": {"name": "uniform", "bits": 4}, "version": 9}, "field 'version'"),
])
def test_canonical_scheme_errors_name_the_dotted_field(doc, msg):
    with pytest.raises(RecipeError, match=msg):
        LayerScheme.from_dict(doc)


def test_scheme_and_config_round_trip():
    s = LayerScheme.from_dict(FLAT)
    cfg = QuantkitConfig.for_schemes({"model.layers.0.mlp.up_proj": s}, recipe="x")
    entry = cfg.to_dict()["modules"]["model.layers.0.mlp.up_proj"]
    assert entry["format"] == {"name": "quantkit-uniform", "version": 2}
    back = QuantkitConfig.from_dict(cfg.to_dict())
    assert back.to_dict() == cfg.to_dict() and cfg.to_dict()["version"] == 3
    assert back.schemes() == {"model.layers.0.mlp.up_proj": s}
    # A format version this quantkit does not read is refused, naming the module.
    entry["format"]["version"] = 3
    with pytest.raises(QuantkitError, match="version 3 is not one this quantkit reads"):
        QuantkitConfig(modules={"model.layers.0.mlp.up_proj": entry})


def test_recipe_kv_cache_section_and_version():
    r = Recipe.from_dict({"schemes": [{"method": "rtn", "bits": 4}], "kv_cache": {"method": "kivi"}})
    assert r.kv_cache.method == "kivi" and Recipe.from_dict(r.to_dict()) == r  # more in test_kvcache_recipe.py
    with pytest.raises(RecipeError, match="field 'schemes'"):
        Recipe.from_dict({"schemes": []})
    with pytest.raises(RecipeError, match="field 'version'"):
        Recipe.from_dict({"schemes": [{"method": "rtn", "bits": 4}], "version": 2})


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
    assert s["model.layers.0.mlp.down_proj"].quantizer.bits == 8
    assert s["model.layers.0.self_attn.q_proj"].method.name == "gptq"
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
