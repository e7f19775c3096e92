"""The three extension points, exercised from outside the package: a toy format with a toy quantizer, and a toy
layer step with its own statistics collector, each defined and registered here and used through
``quantkit.pipeline.quantize`` (the library entry point of ``quantkit quantize``) with no change to quantkit."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import quantkit  # noqa: F401
from quantkit import pipeline
from quantkit.calibration import Collector, LayerContext, LayerStep, register_collector
from quantkit.config import Recipe, Spec
from quantkit.config.spec import FieldError
from quantkit.data import calibration_ids, load_calibration_texts
from quantkit.formats import Format, register_format
from quantkit.loading import load_tokenizer, resolve_model
from quantkit.nn import QuantizedLinear
from quantkit.quantizers import QuantResult, register_quantizer

# --- a toy quantizer: 4-bit codes into a per-row table of 16 levels (the row's quantiles) -------------------------


class RowTableQuantizer:
    codesz = 1
    group_size = -1
    code_dtype = torch.uint8
    shared_params = ()

    def __init__(self, levels: int):
        self.levels = levels
        self.table = torch.empty(0)

    def prepare(self, W, H, perm):
        q = torch.linspace(0, 1, self.levels, dtype=W.dtype)
        self.table = torch.quantile(W.float(), q, dim=1).T.contiguous().half().float()  # [rows, levels], fp16-exact

    def quantize(self, x, col, window):
        codes = (x[:, :, None] - self.table[:, None, :]).abs().argmin(-1)
        return self.decode(codes, col), codes.to(torch.uint8)

    def decode(self, codes, col):
        return self.table.gather(1, codes.long())

    def params(self):
        return {"table": self.table}


@register_quantizer("toy-rowtable")
@dataclasses.dataclass(frozen=True)
class RowTableSpec(Spec):
    part = "quantizer"
    default_format: ClassVar[str] = "toy-table"
    name: str
    levels: int = 16

    def validate(self) -> None:
        if not 2 <= self.levels <= 16:
            raise self.bad("levels", "must be 2 to 16 (codes are 4-bit)")

    def build(self, *, static_groups: bool = False) -> RowTableQuantizer:
        return RowTableQuantizer(self.levels)


# --- a toy format: codes two to a byte, and the fp16 table ---------------------------------------------------------


@register_format
class ToyTableFormat(Format):
    name = "toy-table"
    version = 1
    stores = (RowTableSpec,)

    def check_scheme(self, scheme) -> None:
        super().check_scheme(scheme)
        if scheme.method.act_order:
            raise FieldError("method.act_order", "toy-table stores no permutation", True)

    def tensor_specs(self, scheme, in_features, out_features):
        return {"codes": ((out_features, (in_features + 1) // 2), torch.uint8),
                "table": ((out_features, scheme.quantizer.levels), torch.float16)}

    def pack(self, result: QuantResult, scheme):
        c = torch.nn.functional.pad(result.codes, (0, result.codes.shape[1] % 2))
        return {"codes": (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous(), "table": result.params["table"].half()}

    def unpack(self, tensors, scheme, in_features):
        codes = self.unpack_codes(tensors["codes"], in_features)
        return QuantResult(codes=codes, W_hat=self.dequantize(tensors, scheme, in_features),
                           params={"table": tensors["table"].float()})

    def dequantize(self, tensors, scheme, in_features):
        codes = self.unpack_codes(tensors["codes"], in_features)
        return tensors["table"].float().gather(1, codes.long())

    @staticmethod
    def unpack_codes(c, in_features):
        return torch.stack([c & 15, c >> 4], -1).reshape(c.shape[0], -1)[:, :in_features]


def _toy_recipe(method: str) -> Recipe:
    return Recipe.from_dict({"name": f"toy-{method}", "schemes": [
        {"targets": ["re:.*(q|k|v|o)_proj"], "method": {"name": method},
         "quantizer": {"name": "toy-rowtable", "levels": 16}},
        {"targets": ["re:.*"], "method": method, "grid": "toy-rowtable", "levels": 12},  # the flat shorthand
    ]})


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_toy_format_and_quantizer_quantize_reload_and_match_their_reference(method, tiny_model_factory, calib_file,
                                                                            tmp_path):
    folder = tiny_model_factory("llama")
    out = tmp_path / "q"
    res = pipeline.quantize(str(folder), _toy_recipe(method), out, calib=str(calib_file), nsamples=4, seqlen=64,
                            progress=False)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {m["format"]["name"] for m in cfg["modules"].values()} == {"toy-table"}
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(isinstance(m, QuantizedLinear) for n, m in loaded.named_modules() if n.endswith("_proj"))

    # The reference: the original model with each weight replaced by what the file's codes and table decode to.
    ref = AutoModelForCausalLM.from_pretrained(folder)
    with safe_open(out / "model.safetensors", "pt") as f:
        for name in cfg["modules"]:
            codes = ToyTableFormat.unpack_codes(f.get_tensor(f"{name}.codes"), ref.get_submodule(name).in_features)
            W = f.get_tensor(f"{name}.table").float().gather(1, codes.long())
            ref.get_submodule(name).weight.data = W
            assert int(codes.max()) < (16 if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else 12)
    x = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, ref(x).logits)
    # Bits per weight come from the toy format's specs: 4-bit codes and a 16-bit table per row.
    shapes = [s["shape"] for s in res.report["layers"].values()]
    expected = sum(o * ((i + 1) // 2) * 8 + o * (16 if n.endswith("_proj") and n.rsplit(".", 1)[1][0] in "qkvo"
                                                  else 12) * 16
                   for n, (o, i) in zip(res.report["layers"], shapes, strict=True))
    assert res.report["quantized_bits"] == expected


def test_a_format_refuses_what_it_cannot_store():
    with pytest.raises(quantkit.RecipeError, match="field 'act_order': toy-table stores no permutation"):
        Recipe.from_dict({"schemes": [{"method": "gptq", "act_order": True, "grid": "toy-rowtable"}]})
    with pytest.raises(quantkit.RecipeError, match="field 'levels'"):
        Recipe.from_dict({"schemes": [{"method": "rtn", "grid": "toy-rowtable", "levels": 40}]})


# --- a toy layer step with its own collector: the mean square and count of each linear's inputs --------------------


@register_collector("toy-input-moments")
class InputMoments(Collector):
    def __init__(self, layer, linears, device):
        super().__init__(layer, linears, device)
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def observe(self, name, x):
        x = x.reshape(-1, x.shape[-1]).double()
        self.sums[name] = self.sums.get(name, 0.0) + x.pow(2).mean(1).sum().item()
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def results(self):
        return {n: {"mean_square": self.sums[n] / self.counts[n], "tokens": self.counts[n]} for n in self.sums}


class InputMomentsStep(LayerStep):
    name: ClassVar[str] = "toy-input-moments"
    needs_calibration: ClassVar[bool] = True

    def needs(self, ctx: LayerContext) -> dict[str, set[str]]:
        return {"toy-input-moments": {"self_attn.q_proj", "mlp.down_proj"}}

    def run(self, ctx: LayerContext, stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return stats["toy-input-moments"]


def test_toy_layer_step_records_a_statistic_per_layer(tiny_model_factory, calib_file, tmp_path):
    folder = tiny_model_factory("llama")
    nsamples, seqlen = 3, 32
    # A data-free recipe: the step alone makes the walk calibrate.
    res = pipeline.quantize(str(folder), "rtn-w4g128", tmp_path / "q", calib=str(calib_file), nsamples=nsamples,
                            seqlen=seqlen, progress=False, steps=[InputMomentsStep()])
    rec = json.loads((tmp_path / "q" / "quantkit_report.json").read_text())["steps"]["toy-input-moments"]
    assert rec == res.report["steps"]["toy-input-moments"]
    assert set(rec) == {f"model.layers.{i}" for i in range(3)}
    assert all(set(r) == {"self_attn.q_proj", "mlp.down_proj"} for r in rec.values())
    assert all(v["tokens"] == nsamples * seqlen for r in rec.values() for v in r.values())
    # Layer 0 sees the full-precision model's activations: the same statistic, measured directly.
    model = AutoModelForCausalLM.from_pretrained(folder)
    ids = calibration_ids(load_tokenizer(resolve_model(str(folder))), load_calibration_texts(str(calib_file)),
                          nsamples=nsamples, seqlen=seqlen, seed=0)
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    direct = torch.cat(seen).reshape(-1, seen[0].shape[-1]).double().pow(2).mean().item()
    assert rec["model.layers.0"]["self_attn.q_proj"]["mean_square"] == pytest.approx(direct, rel=1e-6)
    # Another step (or none) is another run: its fingerprint differs, so a rerun does not take this one's output.
    with pytest.raises(quantkit.QuantkitError, match="already holds a different result"):
        pipeline.quantize(str(folder), "rtn-w4g128", tmp_path / "q", progress=False)
