"""The KV cache as a recipe step (issue 19, part 2): the recipe's ``kv_cache`` section, the tables fitted in the
quantize pass on the quantized layers' keys and values, stored with the model, and used by ``from_pretrained``."""

from __future__ import annotations

import collections
import dataclasses
import json

import pytest
import torch
from faultkit import killed_after_layer
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, DynamicCache

import quantkit  # noqa: F401
from quantkit import pipeline
from quantkit.calibration.steps import KVRecorder, LayerStep
from quantkit.config.recipe import Recipe, list_presets, load_recipe
from quantkit.errors import QuantkitError, RecipeError
from quantkit.kvcache import CQLayer, QuantizedKVCache, kv_cache
from quantkit.kvcache.codebook import fit_codebooks
from quantkit.kvcache.stored import KV_FILE, use_kv_cache
from quantkit.verify import verify

CAL = dict(nsamples=4, seqlen=64)
CQ2 = {"method": "cq", "bits": 2, "channels": 4, "residual": 8, "sink": 0, "keys": "post-rope", "outliers": 0,
       "value_outliers": 0}
KV_ONLY = {"name": "kv-cq2", "schemes": [], "kv_cache": CQ2}
W4_CQ2 = {"name": "w4-cq2", "schemes": [{"method": "rtn", "bits": 4, "group_size": 32}], "kv_cache": CQ2}


def _quantize(folder, out, calib_file, recipe, **kw):
    recipe = recipe if isinstance(recipe, (str, Recipe)) else Recipe.from_dict(recipe)
    return pipeline.quantize(str(folder), recipe, out, calib=str(calib_file), progress=False, **{**CAL, **kw})


def _ids(seed=0, n=40):
    return torch.randint(0, 49152, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def kv_only(tiny_model_factory, calib_file, tmp_path_factory):
    return _quantize(tiny_model_factory("llama"), tmp_path_factory.mktemp("kv") / "q", calib_file, KV_ONLY).out


# ---- the recipe section ----

@pytest.mark.parametrize("kv, field", [
    ({"method": "cq", "bits": 3}, "kv_cache.bits"),
    ({"method": "cq", "channels": 3}, "kv_cache.channels"),
    ({"method": "kivi", "bits": 3}, "kv_cache.bits"),
    ({"method": "nope"}, "kv_cache.method"),
    ({"bits": 2}, "kv_cache.method"),
    ({"method": "quanto", "bits": 4}, "kv_cache.method"),
    ({"method": "cq", "residual": -1}, "kv_cache.residual"),
])
def test_bad_kv_field_is_one_line_naming_it(kv, field):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"schemes": [], "kv_cache": kv})
    assert f"field '{field}'" in str(e.value) and "\n" not in str(e.value)


def test_unknown_kv_field_is_named():
    with pytest.raises(RecipeError, match="kv_cache: unknown field 'chanels'"):
        Recipe.from_dict({"schemes": [], "kv_cache": {"method": "cq", "chanels": 4}})


def test_kv_section_round_trips_through_yaml(tmp_path):
    from quantkit.config.recipe import save_recipe

    r = Recipe.from_dict(W4_CQ2)
    save_recipe(r, tmp_path / "r.yaml")
    back = load_recipe(tmp_path / "r.yaml")
    assert back == r and back.kv_cache == r.kv_cache and back.to_dict()["kv_cache"] == CQ2
    assert Recipe.from_dict({"schemes": [{"method": "rtn", "bits": 4}]}).to_dict()["kv_cache"] is None


def test_kv_presets_load():
    for name in ("gptq-w4g128-cq2", "kv-cq2", "kv-cq1", "kv-kivi4"):
        assert name in list_presets()
        r = load_recipe(name)
        assert r.kv_cache is not None
    assert load_recipe("gptq-w4g128-cq2").kv_cache.bits == 2 and load_recipe("kv-cq1").kv_cache.bits == 1
    assert load_recipe("kv-kivi4").kv_cache.method == "kivi" and not load_recipe("kv-kivi4").schemes


def test_kv_scheme_is_part_of_the_fingerprint(tiny_model_factory, calib_file, tmp_path):
    folder = tiny_model_factory("llama")
    _quantize(folder, tmp_path / "q", calib_file, KV_ONLY)
    other = {**KV_ONLY, "kv_cache": {**CQ2, "residual": 16}}
    with pytest.raises(QuantkitError, match="overwrite"):
        _quantize(folder, tmp_path / "q", calib_file, other)
    assert _quantize(folder, tmp_path / "q", calib_file, KV_ONLY).skipped


# ---- the quantize pass ----

def test_kv_only_keeps_dense_weights_and_stores_tables(kv_only, tiny_model_factory):
    src = tiny_model_factory("llama")
    with safe_open(src / "model.safetensors", "pt") as a, safe_open(kv_only / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    q = json.loads((kv_only / "config.json").read_text())["quantization_config"]
    assert q["modules"] == {} and q["kv_cache"]["scheme"] == CQ2 and q["kv_cache"]["file"] == KV_FILE
    assert KV_FILE in json.loads((kv_only / ".quantkit-output.json").read_text())["files"]
    with safe_open(kv_only / KV_FILE, "pt") as f:
        assert f.get_tensor("layers.0.keys.centroids").shape == (2, 6, 256, 4)
        assert "quantkit.sha256" in f.metadata()
    verify(kv_only)


@pytest.mark.parametrize("keys", ["post-rope", "pre-rope"])
def test_tables_are_fitted_on_the_quantized_layers_keys(tiny_model_factory, calib_file, tmp_path, keys):
    """The last layer's key tables equal a k-means fit on the keys the *quantized* model caches at that layer (the
    step's own seed and sample; pre-RoPE: with the rotation taken off at each window's positions), and differ
    from those of the full-precision model."""
    from quantkit.kvcache.calibrate import unrotate_keys
    from quantkit.kvcache.rope import Rope

    folder = tiny_model_factory("llama")
    recipe = {**W4_CQ2, "kv_cache": {**CQ2, "keys": keys}}
    res = _quantize(folder, tmp_path / "q", calib_file, recipe, keep_model=True)
    from quantkit.calibration.capture import capture_inputs
    from quantkit.data import calibration_ids, load_calibration_texts
    from quantkit.loading import load_tokenizer, resolve_model

    ids = calibration_ids(load_tokenizer(resolve_model(str(folder))), load_calibration_texts(str(calib_file)),
                          nsamples=4, seqlen=64, seed=0)
    stored = {}
    with safe_open(tmp_path / "q" / KV_FILE, "pt") as f:
        stored = f.get_tensor("layers.2.keys.centroids")

    def fit(model):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
        K = cache.layers[2].keys.float().permute(1, 0, 2, 3).reshape(2, -1, 24)
        if keys == "pre-rope":
            K = unrotate_keys([K], Rope.of(model), ids.shape[1])[0]
        return fit_codebooks(K, 4, 8, iters=20, seed=2)

    assert torch.equal(fit(res.model), stored)
    fp = AutoModelForCausalLM.from_pretrained(folder)
    assert not torch.equal(fit(fp), stored)
    del capture_inputs


class _RecordAgain(LayerStep):
    """The KV-cache step as it was before the walk's recording pass: an extra pass of the calibration set through
    the quantized layer with a recording cache, the tables fitted by the KV-cache step's own fit."""

    name = "record_again"

    def __init__(self, step):
        self.step, self.tensors, self.records = step, {}, {}

    def run(self, ctx, stats):
        rec = KVRecorder()
        with torch.no_grad():
            for h, kw in zip(ctx.calib.hidden, ctx.calib.kwargs[ctx.index], strict=True):
                ctx.layer(h, **{**kw, "cache": rec})
        mine = dataclasses.replace(ctx, tensors={})
        self.records[ctx.index] = self.step.after_pass(mine, {"method": "cq"}, *rec.result(ctx.prefix))
        self.tensors.update(mine.tensors)
        return {}


def _count_layer_calls():
    """Forward calls of each decoder layer (by index) from now on."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    calls = collections.Counter()

    def hook(module, args, out):
        if isinstance(module, LlamaDecoderLayer):
            calls[module.self_attn.layer_idx] += 1

    return calls, torch.nn.modules.module.register_module_forward_hook(hook)


def test_kv_step_records_in_the_walks_own_pass(tiny_model_factory, calib_file, tmp_path):
    """The KV-cache step gets the keys and values of the walk's final pass: each decoder layer runs as often as
    for the weights alone (one calibration chunk here), and the last layer once more (the weights alone need no
    final pass there); a KV-only recipe runs each layer once. The tables and records equal those of an extra
    recording pass over each quantized layer (the step before the seam), layer by layer."""
    from quantkit.calibration.kvcache import KVCacheStep
    from quantkit.kvcache.scheme import parse_kv_scheme

    folder = tiny_model_factory("llama")
    gptq = {"name": "g4", "schemes": [{"method": "gptq", "bits": 4, "group_size": 32}]}
    counts = {}
    for name, recipe in (("g4", gptq), ("g4-cq2", {**gptq, "kv_cache": CQ2}), ("kv-cq2", KV_ONLY)):
        calls, handle = _count_layer_calls()
        try:
            _quantize(folder, tmp_path / name, calib_file, recipe)
        finally:
            handle.remove()
        counts[name] = [calls[i] for i in range(3)]
    # statistics pass + final pass; the extra recording pass made these [3, 3, 2] and [2, 2, 1]
    assert counts == {"g4": [2, 2, 1], "g4-cq2": [2, 2, 2], "kv-cq2": [1, 1, 1]}, counts

    ref = _RecordAgain(KVCacheStep(parse_kv_scheme(CQ2), seed=0))
    res = _quantize(folder, tmp_path / "ref", calib_file, {**gptq, "kv_cache": CQ2}, steps=[ref])
    with safe_open(tmp_path / "g4-cq2" / KV_FILE, "pt") as f:
        assert sorted(f.keys()) == sorted(k.removeprefix("kv_cache.") for k in ref.tensors)
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), ref.tensors["kv_cache." + k]), k
    for i in range(3):
        assert res.report["steps"]["kv_cache"][f"model.layers.{i}"] == ref.records[i]


def test_resume_is_byte_identical(tiny_model_factory, calib_file, tmp_path):
    folder = tiny_model_factory("llama")
    _quantize(folder, tmp_path / "full", calib_file, W4_CQ2)
    with killed_after_layer(1), pytest.raises(KeyboardInterrupt):
        _quantize(folder, tmp_path / "resumed", calib_file, W4_CQ2)
    assert _quantize(folder, tmp_path / "resumed", calib_file, W4_CQ2).report["resumed_at_layer"] == 2
    for name in ("model.safetensors", KV_FILE, "config.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def test_kv_scheme_the_model_cannot_tile_is_refused_before_any_work(tiny_model_factory, calib_file, tmp_path):
    bad = {**KV_ONLY, "kv_cache": {"method": "kivi", "bits": 4, "group_size": 16}}  # head size 24
    with pytest.raises(RecipeError, match="kv_cache.group_size"):
        _quantize(tiny_model_factory("llama"), tmp_path / "q", calib_file, bad)
    assert not (tmp_path / "q").exists()


# ---- loading ----

def test_reload_uses_the_stored_cache_by_default(kv_only):
    model = AutoModelForCausalLM.from_pretrained(kv_only)
    x = _ids()
    with torch.no_grad():
        out = model(x)
    assert isinstance(out.cache, QuantizedKVCache) and isinstance(out.cache.layers[0], CQLayer)
    # the same as the stored tables passed by hand
    with safe_open(kv_only / KV_FILE, "pt") as f:
        kc = [f.get_tensor(f"layers.{i}.keys.centroids") for i in range(3)]
    assert torch.equal(out.cache.tables.key_centroids[1], kc[1])
    with torch.no_grad():
        explicit = model(x, cache=kv_cache(model, CQ2, out.cache.tables)).logits
        fp = model(x, cache=DynamicCache(config=model.config)).logits  # opt-out: an explicit cache
    assert torch.equal(out.logits, explicit)
    assert not torch.equal(out.logits, fp)  # 40 tokens, residual 8: most of the keys are read back from codes


def test_generate_uses_the_stored_cache_and_opts_out(kv_only):
    model = AutoModelForCausalLM.from_pretrained(kv_only)
    x = _ids(1, 20)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(type(kw.get("cache"))), with_kwargs=True)
    with torch.no_grad():
        q = model.generate(x, max_new_tokens=12, do_sample=False)
        assert seen and all(t is QuantizedKVCache for t in seen)
        seen.clear()
        ref = model.generate(x, max_new_tokens=12, do_sample=False, cache=kv_cache(model, "fp"))
        assert seen and all(t is DynamicCache for t in seen)
        use_kv_cache(model, None)
        seen.clear()
        fp = model.generate(x, max_new_tokens=12, do_sample=False)
        assert all(t is DynamicCache for t in seen)
    hook.remove()
    assert torch.equal(ref, fp) and q.shape == fp.shape


def test_save_reload_gives_identical_logits_through_the_cache(tiny_model_factory, calib_file, tmp_path):
    res = _quantize(tiny_model_factory("llama"), tmp_path / "q", calib_file, W4_CQ2, keep_model=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    x = _ids(2, 48)
    with torch.no_grad():
        a = res.model(x[:, :24]), loaded(x[:, :24])
        b = res.model(x[:, 24:], cache=a[0].cache), loaded(x[:, 24:], cache=a[1].cache)
    assert isinstance(a[1].cache, QuantizedKVCache)
    assert torch.equal(a[0].logits, a[1].logits) and torch.equal(b[0].logits, b[1].logits)


def test_save_reload_save_reload_keeps_the_tables(tiny_model_factory, calib_file, tmp_path):
    """``save_pretrained`` of a model loaded from a folder with CQ tables writes them again (the config it writes
    keeps ``kv_cache``, which names the file): two rounds give the same table bytes and the same logits through
    the cache."""
    out = _quantize(tiny_model_factory("llama"), tmp_path / "q", calib_file, W4_CQ2).out
    x = _ids(3, 48)
    folders, logits = [out], []
    for r in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(folders[-1])
        with torch.no_grad():
            a = model(x[:, :24])
            b = model(x[:, 24:], cache=a.cache)
        assert isinstance(a.cache, QuantizedKVCache)
        logits.append((a.logits, b.logits))
        model.save_pretrained(tmp_path / f"re{r}")
        folders.append(tmp_path / f"re{r}")
    last = AutoModelForCausalLM.from_pretrained(folders[-1])
    with torch.no_grad():
        a = last(x[:, :24])
        logits.append((a.logits, last(x[:, 24:], cache=a.cache).logits))
    for f in folders[1:]:
        assert (f / KV_FILE).read_bytes() == (out / KV_FILE).read_bytes(), f
        q = json.loads((f / "config.json").read_text())["quantization_config"]
        assert q["kv_cache"] == json.loads((out / "config.json").read_text())["quantization_config"]["kv_cache"]
    for la, lb in logits[1:]:
        assert torch.equal(la, logits[0][0]) and torch.equal(lb, logits[0][1])
    assert not torch.equal(logits[0][1], _fp_logits(last, x))  # the second chunk reads codes


def _fp_logits(model, x):
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(x[:, :24], cache=cache)
        return model(x[:, 24:], cache=cache).logits


def test_kivi_recipe_stores_its_scheme_without_tables(tiny_model_factory, calib_file, tmp_path):
    kivi = {"method": "kivi", "bits": 4, "group_size": 8, "residual": 8, "sink": 0}
    out = _quantize(tiny_model_factory("llama"), tmp_path / "q", calib_file, {"schemes": [], "kv_cache": kivi}).out
    assert not (out / KV_FILE).exists()
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["kv_cache"] == {"scheme": kivi, "file": None, "tables": None}
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert model(_ids()).cache.scheme.to_dict() == kivi


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tables_that_do_not_fit_the_model_name_the_file(kv_only, tmp_path):
    bad = _copy(kv_only, tmp_path / "bad")
    with safe_open(kv_only / KV_FILE, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    t["layers.1.values.centroids"] = t["layers.1.values.centroids"][:1].contiguous()  # one KV head, not two
    from quantkit.checkpoint import _write_safetensors

    _write_safetensors(t, bad / KV_FILE)
    with pytest.raises(QuantkitError) as e:
        AutoModelForCausalLM.from_pretrained(bad)
    msg = str(e.value)
    assert KV_FILE in msg and "layers.1.values.centroids" in msg and "2 KV heads" in msg and "\n" not in msg


def test_tables_for_fewer_layers_name_the_file(kv_only, tmp_path):
    bad = _copy(kv_only, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["kv_cache"]["tables"]["num_layers"] = 2
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QuantkitError, match=f"{KV_FILE}: KV-cache tables for 2 layers, the model has 3"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_changed_tables_file_fails_its_checksum(kv_only, tmp_path):
    bad = _copy(kv_only, tmp_path / "bad")
    with safe_open(kv_only / KV_FILE, "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    t["layers.0.keys.centroids"] = t["layers.0.keys.centroids"] + 1
    save_file(t, str(bad / KV_FILE), metadata=meta)
    with pytest.raises(QuantkitError, match=f"{KV_FILE}: layers.0.keys.centroids: checksum mismatch"):
        AutoModelForCausalLM.from_pretrained(bad)
    (bad / KV_FILE).unlink()
    with pytest.raises(QuantkitError, match=f"{KV_FILE}: missing"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_eval_kv_cache_model_scores_the_folders_own_cache(kv_only, tiny_model_factory, data_dir):
    """``--kv-cache model`` equals the same scheme with the folder's tables given by hand; a folder without a stored
    scheme is refused before loading."""
    from quantkit.eval.runner import evaluate

    own = evaluate(str(kv_only), ppl="none", kv_cache="model", kv_windows=1, data_dir=data_dir)["kv_cache"][0]
    by_hand = evaluate(str(kv_only), ppl="none", kv_cache=CQ2, kv_windows=1, data_dir=data_dir,
                       kv_tables=_tables_file(kv_only))["kv_cache"][0]
    assert own["scheme"] == CQ2 and own["chunked"]["ppl"] == by_hand["chunked"]["ppl"]
    with pytest.raises(QuantkitError, match="stores no KV-cache scheme"):
        evaluate(str(tiny_model_factory("llama")), ppl="none", kv_cache="model", kv_windows=1, data_dir=data_dir)


def _tables_file(folder):
    """The folder's tables as a standalone ``CQTables`` file (what ``--kv-tables`` reads)."""
    from quantkit.kvcache.stored import load_stored

    cfg = json.loads((folder / "config.json").read_text())
    _, tables = load_stored(folder, cfg["quantization_config"]["kv_cache"], AutoModelForCausalLM.from_pretrained(
        folder).config)
    path = folder.parent / "tables.safetensors"
    tables.save(path)
    return path


@pytest.mark.slow
def test_smollm2_kv_only_cq2_generate_answers_paris(smollm2_folder, data_dir, tmp_path):
    """SmolLM2 with a KV-only CQ 2-bit recipe (4 × 256 C4 tokens of calibration, a residual window of 8 so that
    most of the prompt is read back from codes): the reloaded folder's ``generate()`` runs through the quantized
    cache and still answers the capital-of-France prompt."""
    from transformers import AutoTokenizer

    recipe = {"name": "kv-cq2-r8", "schemes": [], "kv_cache": {**CQ2, "residual": 8}}
    out = pipeline.quantize(str(smollm2_folder), Recipe.from_dict(recipe), tmp_path / "q", calib="c4",
                            nsamples=4, seqlen=256, data_dir=data_dir, progress=False).out
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")["input_ids"]
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(type(kw.get("cache"))), with_kwargs=True)
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=24, do_sample=False)
    hook.remove()
    assert ids.shape[1] > 16 and seen and all(t is QuantizedKVCache for t in seen)
    assert "Paris" in tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
