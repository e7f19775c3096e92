"""What the Triton kernel tests share: the mode this run compiles in (tests/conftest.py sets
``TRITON_INTERPRET=1`` unless the environment says otherwise) and the kernel modules loaded in it."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import pytest
import torch

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def kernel_module(name: str) -> ModuleType:
    """``quantkit.kernels.<name>``, compiled the way this run asks (interpreter or CUDA); the test is skipped, and
    says why, where that cannot be done."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed (pip install 'quantkit[triton]')")
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET=0 needs a CUDA GPU")
    mod = importlib.import_module(f"quantkit.kernels.{name}")
    if mod.is_interpreted() != INTERPRET:  # imported earlier in this process under the other mode
        mod = importlib.reload(mod)
    assert mod.is_interpreted() == INTERPRET
    return mod
