"""``quantkit export --to compressed-tensors``, checked by the target's own code: each export is loaded in a fresh
process that never imports quantkit, by transformers' compressed-tensors integration, and compared with quantkit's
own load of the source.

The tolerance, from where rounding enters (quantkit.export.compressed_tensors): transformers' dequantize path
computes each weight as ``(q - zp) * scale`` in the stored scales' dtype, float16, so every exported weight is exactly
the float16 rounding of quantkit's (its default path, taken by exports with several config groups, computes in the
model's dtype: exact in float32); both are checked weight by weight, exactly. Loaded in float16 the logits are
bit-identical to quantkit's float16 load; in float32 they differ by that rounding only, at most ``FP32_TOL`` relative
to the largest logit. Refusals: one line naming the layer, exit status 2, nothing written, the source untouched.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import quantkit  # noqa: F401
from quantkit import pipeline
from quantkit.cli import main as cli
from quantkit.nn import QuantizedLinear

CAL = dict(nsamples=6, seqlen=64)
FP32_TOL = 2e-3  # max |logit difference| / max(1, max |logit|), float32 loads (observed: 3e-4 tiny, see README)

RECIPES = {
    "rtn-w8": "rtn-w8",  # 8-bit asymmetric, one scale per output channel (strategy "channel")
    "gptq-w4g32-actorder": dict(method="gptq", bits=4, group_size=32, act_order=True, static_groups=True),
    "gptq-w4g32-sym": dict(method="gptq", bits=4, group_size=32, symmetric=True),
    # act-order with its stored permutation, one group per row: the codes travel back to the original order
    "gptq-w4-actorder-perm": dict(method="gptq", bits=4, group_size=-1, act_order=True),
    # 96 = 64 + 32 and 160 = 2·64 + 32: partial last groups, re-expressed as groups of 32
    "gptq-w4g64-partial": dict(method="gptq", bits=4, group_size=64),
    "rtn-w3g32": dict(method="rtn", bits=3, group_size=32),  # 3-bit codes straddle int32 words
    # two config groups (8-bit per channel down_proj, 4-bit groups elsewhere), layer 0 left dense: symmetric, so
    # transformers' default path, which reads each layer under its own scheme
    "mixed-sym": [dict(targets=["down_proj"], method="rtn", bits=8, group_size=-1, symmetric=True),
                  dict(targets=["re:.*"], method="gptq", bits=4, group_size=32, symmetric=True)],
}
REFUSED = {
    "hadamard-rtn-w4g128": "stored rotated",
    "rtn-nf4g128": "non-uniform",
    "vq": "not a scalar integer grid",
    "gptq-w4g128": "act-order's processing order",  # dynamic groups: 160 = 128 + 32 stored columns
    "mixed-asym": "under one scheme only",
}

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")

CHILD = r"""
import sys, torch
from transformers import AutoModelForCausalLM
folder, ids, out = sys.argv[1], torch.load(sys.argv[2]), sys.argv[3]
res = {"logits": {}}
for dtype in (torch.float16, torch.float32):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    with torch.no_grad():
        res["logits"][str(dtype)] = model(ids).logits.float()
res["weights"] = {k: v.clone() for k, v in model.state_dict().items()}
res["linear_types"] = sorted({type(m).__module__ + "." + type(m).__name__ for n, m in model.named_modules()
                              if n.endswith("_proj")})
res["quantkit_imported"] = "quantkit" in sys.modules
torch.save(res, out)
"""


SOURCES = {**RECIPES, "mixed-asym": [{**s, "symmetric": False} for s in RECIPES["mixed-sym"]],
           "vq": dict(method=dict(name="gptq", act_order=True), quantizer=dict(name="vq", dim=4, entries=256))}


def _recipe_file(tmp_path: Path, name: str, schemes: dict | list | str) -> str:
    """A preset's name, or a recipe file of one scheme for every linear or of a list of schemes (``targets``)."""
    if isinstance(schemes, str):
        return schemes
    schemes = [{"targets": ["re:.*"], **schemes}] if isinstance(schemes, dict) else schemes
    recipe = {"name": name, "schemes": schemes}
    if name.startswith("mixed"):
        recipe["ignore"] = ["re:model\\.layers\\.0\\..*"]
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return str(path)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, tiny_model_factory, calib_file):
    """``get(name) -> folder``: the tiny Llama quantized with a recipe of RECIPES or REFUSED (once per module)."""
    made: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("export-src")

    def get(name: str) -> Path:
        if name not in made:
            recipe = _recipe_file(root, name, SOURCES.get(name, name))
            pipeline.quantize(str(tiny_model_factory("llama")), recipe, root / name, calib=str(calib_file),
                              progress=False, **CAL)
            made[name] = root / name
        return made[name]

    return get


@pytest.fixture
def reference(monkeypatch):
    """quantkit's forward through its PyTorch reference: its CPU kernels (kernels/cpu.py) round float32 operands to
    bfloat16, which is their own tolerance, not the export's."""
    monkeypatch.setenv("QUANTKIT_CPU_KERNELS", "0")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def load_in_fresh_process(folder: Path, ids: torch.Tensor, tmp_path: Path) -> dict:
    """Load ``folder`` with plain transformers in a new interpreter that never imports quantkit."""
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(tmp_path / "ids.pt"),
                           str(tmp_path / "res.pt")], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)  # not the repository root, where kernels/ passes for the hub package
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = torch.load(tmp_path / "res.pt")
    assert not res["quantkit_imported"], "loading the export imported quantkit"
    return res


def check_against_quantkit(src: Path, out: Path, ids: torch.Tensor, tmp_path: Path) -> dict[str, float]:
    """The export's weights and logits, loaded by the target's code, against quantkit's own load of ``src``
    (with the ``reference`` fixture: its PyTorch reference forward); returns the measured differences."""
    res = load_in_fresh_process(out, ids, tmp_path)
    assert res["linear_types"] == ["torch.nn.modules.linear.Linear"]  # compressed-tensors' dense path
    fp16_product = json.loads((out / "config.json").read_text())["quantization_config"].get("dequantize", False)
    diffs = {}
    for dtype in (torch.float32, torch.float16):
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
        with torch.no_grad():
            want = ref(ids).logits.float()
        diffs[str(dtype)] = (res["logits"][str(dtype)] - want).abs().max().item()
        diffs.setdefault("max_abs_logit", want.abs().max().item())  # float32 first
        if dtype != torch.float32:
            continue
        # Weight by weight, from the float32 load: quantkit's exact weight, rounded to float16 where transformers'
        # dequantize path multiplies in the stored scales' dtype (its default path uses the model's); every other
        # tensor (embeddings, norms, biases) as stored.
        quantized = {n: m for n, m in ref.named_modules() if isinstance(m, QuantizedLinear)}
        for name, module in quantized.items():
            W = module.dequantize(torch.float32)
            assert torch.equal(res["weights"][f"{name}.weight"], W.half().float() if fp16_product else W), name
        modules = json.loads((src / "config.json").read_text())["quantization_config"]["modules"]
        assert len(quantized) == len(modules)
        for key, value in ref.state_dict().items():
            if key.rsplit(".", 1)[0] not in quantized or key.endswith(".bias"):
                assert torch.equal(res["weights"][key], value.float()), key
    # Without act-order's permutation both compute x @ W.T with the same float16 W: bit-identical. With it,
    # quantkit permutes x instead of W (quantkit.formats.uniform), another summation order: a few float16 ulps.
    permuted = any("perm" in m.tensors for m in quantized.values())
    assert diffs["torch.float16"] <= (2**-8 * max(1.0, diffs["max_abs_logit"]) if permuted else 0.0), diffs
    assert diffs["torch.float32"] <= FP32_TOL * max(1.0, diffs["max_abs_logit"]), diffs
    return diffs


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_export_loads_through_compressed_tensors(name, quantized, tmp_path, reference):
    src = quantized(name)
    before = _digests(src)
    out = tmp_path / "ct"
    assert cli(["export", str(src), "--to", "compressed-tensors", "--out", str(out)]) == 0
    assert _digests(src) == before  # the source is only read
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    groups = list(qc["config_groups"].values())
    if name == "mixed-sym":  # layer 0 dense, two schemes: transformers' default path
        assert qc["ignore"] == sorted(["lm_head", *(f"model.layers.0.{m}" for m in LINEARS)])
        assert sorted(len(g["targets"]) for g in groups) == [2, 12] and "dequantize" not in qc
    else:  # one scheme: transformers' dequantize path
        assert qc["ignore"] == ["lm_head"] and qc["dequantize"] is True
        assert [len(g["targets"]) for g in groups] == [21]
    if name == "gptq-w4g64-partial":  # 96 and 160 columns: groups of gcd(64, in) = 32
        assert groups[0]["weights"]["group_size"] == 32
        report = json.loads((out / "quantkit_export.json").read_text())
        assert report["regrouped"]["model.layers.0.mlp.down_proj"] == {"groups_per_row": 5,
                                                                      "source_groups_per_row": 3}
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / side).read_bytes() == (src / side).read_bytes()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    check_against_quantkit(src, out, ids, tmp_path)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refusals_name_the_layer_and_write_nothing(name, quantized, tmp_path, capsys):
    src = quantized(name)
    before = _digests(src)
    capsys.readouterr()  # the quantization's progress bars
    out = tmp_path / "ct"
    assert cli(["export", str(src), "--to", "compressed-tensors", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("quantkit: error: cannot export model.layers.")
    assert REFUSED[name] in err, err
    assert not any(tmp_path.glob("ct*"))  # no OUT, no OUT.quantkit-tmp, no lock left behind
    assert _digests(src) == before


def test_gptq_target_is_not_implemented(quantized, tmp_path, capsys):
    assert cli(["export", str(quantized("rtn-w8")), "--to", "gptq", "--out", str(tmp_path / "g")]) == 2
    assert "--to gptq is not implemented" in capsys.readouterr().err
    assert not any(tmp_path.glob("g*"))


def test_existing_out_rerun_and_overwrite(quantized, tmp_path, capsys):
    out = tmp_path / "ct"
    args = ["--to", "compressed-tensors", "--out", str(out)]
    assert cli(["export", str(quantized("rtn-w8")), *args]) == 0
    assert cli(["export", str(quantized("rtn-w8")), *args]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("unchanged")
    assert cli(["export", str(quantized("gptq-w4g32-sym")), *args]) == 2  # another export: only with --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["export", str(quantized("gptq-w4g32-sym")), *args, "--overwrite"]) == 0
    assert json.loads((out / "quantkit_export.json").read_text())["source"] == str(quantized("gptq-w4g32-sym"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    # a folder quantkit did not write is never replaced, not even with --overwrite
    assert cli(["export", str(quantized("rtn-w8")), "--to", "compressed-tensors", "--out", str(mine),
                "--overwrite"]) == 2
    assert (mine / "notes.txt").read_text() == "keep"


def test_damaged_source_is_refused(quantized, tmp_path, capsys):
    import shutil

    src = Path(shutil.copytree(quantized("rtn-w8"), tmp_path / "src"))
    data = bytearray((src / "model.safetensors").read_bytes())
    data[-3] ^= 0x10  # a flipped bit in the last tensor's bytes
    (src / "model.safetensors").write_bytes(bytes(data))
    assert cli(["export", str(src), "--to", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert not (tmp_path / "ct").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["gptq-w4g128-static", "rtn-w8"])
def test_smollm2_preset_export_matches_quantkit(preset, smollm2_folder, calib_file, tmp_path, reference):
    """The real SmolLM2 through two presets: GPTQ 4-bit act-order with static groups of 128 (576 = 4·128 + 64
    columns, so every layer travels in groups of 64, down_proj's 1536 too: one config group; a tiny calibration,
    2 × 64 tokens) and round-to-nearest 8-bit per channel."""
    from transformers import AutoTokenizer

    src = tmp_path / "src"
    pipeline.quantize(str(smollm2_folder), preset, src, calib=str(calib_file), nsamples=2, seqlen=64,
                      progress=False)
    out = tmp_path / "ct"
    assert cli(["export", str(src), "--to", "compressed-tensors", "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(src)
    ids = tok(["The capital of France is Paris, and the capital of Italy is Rome."], return_tensors="pt")["input_ids"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [g["weights"]["group_size"] for g in qc["config_groups"].values()] == ([64] if preset.startswith("gptq")
                                                                                    else [None])
    diffs = check_against_quantkit(src, out, ids, tmp_path)
    assert diffs["max_abs_logit"] > 5  # real logits, not a degenerate model
