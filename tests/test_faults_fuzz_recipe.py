"""Property-based fuzzing of recipes (issue 20): whatever YAML a user writes, ``load_recipe`` returns a recipe
that round-trips, or raises ``RecipeError`` (one line through the CLI); never another exception. Bounded: a fixed
number of examples per property, no deadline, derandomized so that CI sees the same cases each run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantkit.config.recipe import Recipe, load_recipe
from quantkit.errors import QuantkitError, RecipeError

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Values a field might get: right types, wrong types, edge numbers, odd strings.
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70000), st.sampled_from([0, 1, 2, 3, 4, 8, 16, 128, 256, -1, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["gptq", "rtn", "vq", "uniform", "nf4", "fp4", "hadamard", "none", "re:.*", "re:(", "q_proj",
                     "quantkit-uniform", "quantkit-vq", "mse", "gaussian", "lm_head", "re:model\\.embed.*"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
SCHEME_KEYS = ["targets", "method", "bits", "group_size", "act_order", "symmetric", "grid", "damp", "block_size",
               "mse_clip", "rotation", "quantizer", "format", "attention_weighted", "name", "dim", "entries",
               "kind", "output", "version"]
scheme = st.dictionaries(st.sampled_from(SCHEME_KEYS) | st.text(max_size=6), values, max_size=6)
nested_scheme = st.fixed_dictionaries({}, optional={
    "targets": st.lists(st.sampled_from(["re:.*", "q_proj", "re:(", "mlp.down_proj", "lm_head"]), max_size=2),
    "method": st.one_of(st.sampled_from(["gptq", "rtn", "nope"]),
                        st.fixed_dictionaries({"name": st.sampled_from(["gptq", "rtn", "x"])},
                                              optional={"act_order": values, "damp": values})),
    "quantizer": st.fixed_dictionaries({"name": st.sampled_from(["uniform", "vq", "nf4", "zz"])},
                                       optional={"bits": values, "group_size": values, "dim": values,
                                                 "entries": values, "symmetric": values}),
    "rotation": st.one_of(values, st.fixed_dictionaries({"kind": st.sampled_from(["hadamard", "none", "q"])})),
    "format": st.sampled_from(["quantkit-uniform", "quantkit-vq", "gguf"]),
})
recipe = st.fixed_dictionaries({}, optional={
    "name": values, "description": values, "version": values, "ignore": values, "kv_cache": values,
    "schemes": st.one_of(values, st.lists(st.one_of(scheme, nested_scheme), min_size=1, max_size=3)),
}) | st.dictionaries(st.text(max_size=8), values, max_size=3)


PRESETS = ["gptq-w4g128", "rtn-w3g128", "hadamard-gptq-vq2", "hadamard-gaussian-w4g128"]


@st.composite
def mutated_preset(draw) -> dict:
    """A preset's canonical dict with a few fields deleted, replaced or added, anywhere in it: mostly near-valid
    recipes, so that both outcomes (a recipe, an error) are exercised."""
    d = load_recipe(draw(st.sampled_from(PRESETS))).to_dict()
    for _ in range(draw(st.integers(0, 3))):
        node = d
        while isinstance(node, (dict, list)) and node and draw(st.booleans()):
            key = draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node))))
            if not isinstance(node[key], (dict, list)):
                break
            node = node[key]
        if isinstance(node, dict):
            op = draw(st.sampled_from(["set", "delete", "add"]))
            if op == "add" or not node:
                node[draw(st.sampled_from(SCHEME_KEYS))] = draw(values)
            else:
                key = draw(st.sampled_from(sorted(node)))
                if op == "delete":
                    del node[key]
                else:
                    node[key] = draw(values)
        elif isinstance(node, list) and node:
            node[draw(st.integers(0, len(node) - 1))] = draw(values)
    return d


def _load(path: Path) -> Recipe | None:
    try:
        return load_recipe(path)
    except (RecipeError, NotImplementedError):  # NotImplementedError: kv_cache (its own clear message)
        return None


@SETTINGS
@given(data=recipe | mutated_preset())
def test_any_recipe_mapping_loads_or_is_a_recipe_error(data, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    r = _load(path)
    if r is not None:  # what loads round-trips through YAML to the same recipe
        again = tmp_path / "again.yaml"
        again.write_text(r.to_yaml())
        assert load_recipe(again).to_dict() == r.to_dict()


noise = st.text(alphabet=st.sampled_from(list("abc:-[]{}#&*!|>'\"%@` \n\t,.?0123456789")), max_size=200)


@SETTINGS
@given(content=st.binary(max_size=400) | noise)
def test_any_bytes_or_yaml_noise_as_a_recipe_file_are_a_recipe_or_a_recipe_error(content, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    _load(path)  # anything but RecipeError (or kv_cache's NotImplementedError) propagates and fails


@pytest.mark.parametrize("name", ["gptq-w4g128", "hadamard-gptq-vq2", "rtn-w3g128"])
def test_presets_are_still_recipes(name):
    assert isinstance(load_recipe(name), Recipe) and issubclass(RecipeError, QuantkitError)
