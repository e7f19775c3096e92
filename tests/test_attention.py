"""Attention-weighted Hessians for value projections: the attention each token receives, measured inside the
calibration forward, against transformers' own eager attention; the per-head GPTQ; the pipeline wiring."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

from quantkit.algos.attention import HeadHessianAccumulator, attention_received, recording_attention
from quantkit.algos.gptq import gptq
from quantkit.algos.hessian import HessianAccumulator, output_error
from quantkit.algos.rtn import rtn
from quantkit.grids import UniformGrid
from quantkit.quantizers.scalar import ScalarQuantizer


def _model(arch: str, impl: str):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    cfg = LlamaConfig(**common) if arch == "llama" else MistralConfig(**common, sliding_window=7)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation=impl).eval()


def _eager_received(model, ids, attention_mask):
    """Column sums of the attention probabilities transformers' eager attention returns, per KV head,
    padded queries left out."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(ids, output_attentions=True, attention_mask=attention_mask)
    nkv = model.config.num_key_value_heads
    res = []
    for a in out.attentions:  # [b, nq, t, t]
        a = a * attention_mask[:, None, :, None]
        b, nq, _, t = a.shape
        res.append(a.sum(2).reshape(b, nkv, nq // nkv, t).mean(2))
    return res


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_received_attention_matches_eager_probabilities(arch, impl):
    model = _model(arch, impl)
    ids = torch.randint(0, 128, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row: a real mask reaches the attention function
    seen: dict[int, torch.Tensor] = {}
    attns = {m: i for i, m in enumerate(m.self_attn for m in model.model.layers)}
    callbacks = {m: (lambda c, i=i: seen.__setitem__(i, c)) for m, i in attns.items()}
    with torch.no_grad():
        ref_logits = model(ids, attention_mask=mask).logits
        with recording_attention(callbacks):
            logits = model(ids, attention_mask=mask).logits
    # the output is untouched (eager is each model's own function: sdpa stands in for it while recording)
    tol = 0 if impl == "sdpa" else 1e-5
    torch.testing.assert_close(logits, ref_logits, rtol=tol, atol=tol)
    ref = _eager_received(model, ids, attention_mask=mask)
    assert len(seen) == len(ref)
    for i, r in enumerate(ref):
        torch.testing.assert_close(seen[i], r, rtol=1e-4, atol=1e-4)
    # each query spreads one unit of attention; padded queries attend to nothing
    torch.testing.assert_close(seen[0].sum(-1), torch.tensor([[40.0, 40.0], [35.0, 35.0]]))


def test_recording_restores_the_attention_functions():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    model = _model("llama", "sdpa")
    with recording_attention({model.model.layers[0].self_attn: lambda c: None}):
        assert "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == before


def test_causal_received_without_mask():
    q, k = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)
    c = attention_received(q, k, None, chunk=5)
    # the last key is seen only by the last query; the first by every query
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(torch.ones(16, 16).triu(1).bool(), float("-inf"))
    ref = scores.softmax(-1).sum(2).reshape(1, 2, 2, 16).mean(2)
    torch.testing.assert_close(c, ref)


def test_head_accumulator_is_weighted_sum():
    X = torch.randn(2, 10, 6)
    c = torch.rand(2, 3, 10)
    acc = HeadHessianAccumulator(3, 6)
    acc.add(X, c)
    for h in range(3):
        ref = sum(c[b, h, t] * torch.outer(X[b, t], X[b, t]) for b in range(2) for t in range(10)) * 2 / 20
        torch.testing.assert_close(acc.H[h], ref.float(), rtol=1e-5, atol=1e-6)
    plain = HessianAccumulator(6)
    plain.add(X)
    ones = HeadHessianAccumulator(1, 6)
    ones.add(X, torch.ones(2, 1, 10))
    torch.testing.assert_close(ones.H[0], plain.H)


def test_gptq_per_head_hessians():
    """Row blocks with their own Hessians: each block is GPTQ against its Hessian, with one shared act-order
    permutation; the result beats round-to-nearest on the per-head objective."""
    torch.manual_seed(0)
    W = torch.randn(8, 48)
    Hs = []
    for _ in range(2):
        X = torch.randn(48, 300) * torch.linspace(0.2, 3, 48)[:, None]
        Hs.append(2 * X @ X.T / 300)
    H = torch.stack(Hs)
    grid = UniformGrid(3)
    r = gptq(W, H, ScalarQuantizer(grid, 16), act_order=True)
    perm = torch.argsort(torch.diagonal(H.sum(0)), descending=True, stable=True)
    torch.testing.assert_close(r.perm, perm)
    for i in range(2):
        block = gptq(W[4 * i : 4 * i + 4], H[i], ScalarQuantizer(grid, 16), act_order=True, perm=perm)
        assert torch.equal(r.codes[4 * i : 4 * i + 4], block.codes)
        assert torch.equal(r.W_hat[4 * i : 4 * i + 4], block.W_hat)
    base = rtn(W, ScalarQuantizer(grid, 16))
    assert output_error(W, r.W_hat, H) < output_error(W, base.W_hat, H)
    with pytest.raises(ValueError, match="only used with act_order"):
        gptq(W, H[0], ScalarQuantizer(grid, 16), perm=perm)


def test_pipeline_weights_value_projections(tiny_model_factory, calib_file, tmp_path, monkeypatch):
    """The pipeline gives v_proj per-head weighted Hessians (its report objective differs from the plain one
    that q_proj shares), and ``attention_weighted: false`` turns it off."""
    import quantkit.calibration.quantize as step
    import quantkit.pipeline as pipeline
    from quantkit.config import Recipe

    seen: dict[str, torch.Tensor] = {}
    real = step.quantize_linear

    def spy(name, linear, scheme, H):
        seen[name] = H
        return real(name, linear, scheme, H)

    monkeypatch.setattr(step, "quantize_linear", spy)
    folder = tiny_model_factory("llama")
    for weighted in (True, False):
        recipe = Recipe.from_dict({"name": "t", "schemes": [{"targets": ["re:.*"], "method": "gptq", "bits": 4,
                                                             "group_size": 32, "attention_weighted": weighted}]})
        seen.clear()
        pipeline.quantize(str(folder), recipe, tmp_path / f"out-{weighted}", calib=str(calib_file), nsamples=2,
                          seqlen=64, progress=False)
        v, q = seen["model.layers.0.self_attn.v_proj"], seen["model.layers.0.self_attn.q_proj"]
        if weighted:
            assert v.shape == (2, 96, 96)  # two KV heads
            assert not torch.allclose(v.mean(0), q)
            # the weights sum to the number of queries: the scale matches the unweighted Hessian's
            assert v.sum(0).trace() / 2 == pytest.approx(q.trace().item(), rel=0.5)
        else:
            assert torch.equal(v, q)
