"""The perplexity protocol (DESIGN.md): row handling, one tokenization, non-overlapping windows, mean token NLL."""

import math

import pytest
import torch

from quantkit.eval.perplexity import perplexity, wikitext2_text


def test_wikitext2_rows_follow_the_protocol(data_dir):
    text = wikitext2_text(data_dir)
    lines = (data_dir / "wikitext-2-raw" / "wiki.test.raw").read_text().splitlines(keepends=True)
    assert len(lines) == 4358
    # Empty rows for lone-space lines, other rows keep their newline, joined by blank lines.
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n")
    assert len(text) == sum(0 if line == " \n" else len(line) for line in lines) + 2 * (len(lines) - 1)


def test_smollm2_token_count(data_dir, smollm2_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_folder)
    assert tok(wikitext2_text(data_dir), return_tensors="pt").input_ids.numel() == 304_986


def test_perplexity_equals_direct_computation(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama")).eval()
    ids = torch.randint(0, 49152, (1000,), generator=torch.Generator().manual_seed(0))
    r = perplexity(model, ids, seqlen=128, progress=False)
    assert r.windows == 7 and r.tokens == 1000  # 1000 // 128; the remainder is dropped
    with torch.no_grad():
        losses = [model(ids[i * 128:(i + 1) * 128][None], labels=ids[i * 128:(i + 1) * 128][None]).loss.item()
                  for i in range(7)]
    assert r.ppl == pytest.approx(math.exp(sum(losses) / 7), rel=1e-5)
    assert perplexity(model, ids, seqlen=128, windows=3, progress=False).windows == 3
