"""Checkpoints written by earlier quantkits keep loading, to the logits that quantkit computed.

The fixtures (tests/fixtures/format_v*/; how they were made: tests/fixtures/make_legacy_checkpoints.py) are tiny
Llamas quantized by the commits that wrote format versions 1 and 2, with their logits for fixed input ids.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import quantkit  # noqa: F401  (registers the loader)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("version", [1, 2])
def test_legacy_checkpoint_loads_to_the_same_logits(version):
    folder = FIXTURES / f"format_v{version}"
    expected = load_file(folder / "expected_logits.safetensors")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.quantization_config.to_dict()["version"] == version
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert torch.equal(logits, expected["logits"])
