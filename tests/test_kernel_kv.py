"""The Triton decode-attention kernel over a CQ cache (quantkit.kernels.triton_kv, via
quantkit.kvcache.attention.decode_attention) against the PyTorch reference: every key and value read back as the
cache layer returns them, then softmax attention in float32.

The caches are filled through the layer's own ``update`` (its encoder, sink and residual windows). Without a GPU
the kernel runs under the Triton interpreter on CPU tensors (tests/conftest.py sets ``TRITON_INTERPRET=1``); on a
GPU, ``TRITON_INTERPRET=0 pytest tests/test_kernel_kv.py`` runs the same checks compiled.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernelkit import DEVICE, kernel_module

from quantkit.kvcache.layers import CQLayer
from quantkit.kvcache.rope import Rope

TOL = 2e-5  # float32 throughout; only the order of the sums differs. A wrong code moves outputs by ~1e-2 and more.


@pytest.fixture(scope="module")
def attention():
    kernel_module("triton_kv")
    return importlib.import_module("quantkit.kvcache.attention")


def _layer(*, bits, channels, D=32, Hkv=2, B=2, T=70, sink=3, residual=5, rope=None, offset=0, seed=0,
           chunk=9):
    """A CQ layer with random tables, fed ``T`` random tokens in chunks through ``update`` (positions from
    ``offset``)."""
    g = torch.Generator().manual_seed(seed)
    code_bits = bits * channels
    tables = [torch.randn(Hkv, D // channels, 2**code_bits, channels, generator=g).half() for _ in range(2)]
    layer = CQLayer(code_bits=code_bits, key_centroids=tables[0], value_centroids=tables[1], residual=residual,
                    sink=sink, rope=rope)
    for s in range(0, T, chunk):
        n = min(chunk, T - s)
        pos = torch.arange(offset + s, offset + s + n).expand(B, n)
        layer.update(torch.randn(B, Hkv, n, D, generator=g).to(DEVICE), torch.randn(B, Hkv, n, D, generator=g)
                     .to(DEVICE), kwargs={"position_ids": pos.to(DEVICE)})
    return layer


def _q(layer, Hq, seed=1):
    B = layer.keys.shape[0]
    return (3 * torch.randn(B, Hq, layer.head_dim, generator=torch.Generator().manual_seed(seed))).to(DEVICE)


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("bits, channels", [(2, 4), (1, 8), (4, 2), (1, 2), (2, 2), (1, 4), (1, 1)])
def test_matches_reference(attention, bits, channels):
    layer = _layer(bits=bits, channels=channels)
    assert layer.stored_tokens == 70 - 3 - 5
    q = _q(layer, 4)
    assert _err(attention.decode_attention(layer, q), attention.decode_attention_reference(layer, q)) < TOL


@pytest.mark.parametrize("block_t, splits", [(16, 1), (16, 3), (64, 2), (8, 8)])
def test_tiles_and_splits(attention, block_t, splits):
    """Partial last tiles, splits whose last tile lies past the store, and splits with no token at all."""
    layer = _layer(bits=2, channels=4, T=50, sink=0, residual=0)
    q = _q(layer, 6)
    ref = attention.decode_attention_reference(layer, q)
    assert _err(attention.decode_attention(layer, q, block_t=block_t, splits=splits), ref) < TOL


@pytest.mark.parametrize("rotary", [32, 16])
def test_pre_rope_keys_rotated_in_the_kernel(attention, rotary):
    """Keys coded before RoPE get the rotation back inside the kernel at each token's stored position (offset,
    so positions are not token indices), over all channels or the first ``rotary`` (partial rotary)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary, 2, dtype=torch.float) / rotary)
    rope = Rope(inv_freq, scaling=1.25)
    layer = _layer(bits=4, channels=2, rope=rope, offset=1000, sink=2, residual=7)
    q = _q(layer, 4)
    ref = attention.decode_attention_reference(layer, q)
    assert _err(attention.decode_attention(layer, q), ref) < TOL
    # the kernel really rotates: dropping the positions (no rotation back) is far off
    from quantkit.kernels.triton_kv import cq_decode_attention

    raw, _ = cq_decode_attention(q, layer.store_keys["codes"], layer.store_values["codes"],
                                 layer.centroids["keys"], layer.centroids["values"], code_bits=8,
                                 sm_scale=layer.head_dim**-0.5)
    layer.keys = layer.keys[..., :0, :]
    layer.values = layer.values[..., :0, :]
    layer.sink_keys = layer.sink_keys[..., :0, :]
    layer.sink_values = layer.sink_values[..., :0, :]
    store_only = attention.decode_attention_reference(layer, q)
    assert _err(attention.decode_attention(layer, q), store_only) < TOL
    assert _err(raw, store_only) > 1e-2


def test_only_full_precision_tokens(attention):
    layer = _layer(bits=2, channels=4, T=6, sink=2, residual=8)
    assert layer.stored_tokens == 0
    q = _q(layer, 2)
    assert _err(attention.decode_attention(layer, q), attention.decode_attention_reference(layer, q)) < TOL


def test_a_wrong_code_fails_the_comparison(attention):
    """One token's key code (or one value code) moved by one entry: the kernel reads what it is given, and the
    comparison with the reference of the true cache fails; the true codes pass."""
    layer = _layer(bits=2, channels=4, T=40, sink=0, residual=0)
    q = _q(layer, 4)
    ref = attention.decode_attention_reference(layer, q)
    assert _err(attention.decode_attention(layer, q), ref) < TOL
    for kind in ("keys", "values"):
        store = getattr(layer, f"store_{kind}")
        true = store["codes"].clone()
        store["codes"][:, :, 17, 3] += 1
        assert _err(attention.decode_attention(layer, q), ref) > 10 * TOL, kind
        store["codes"].copy_(true)


def test_fp16_query(attention):
    layer = _layer(bits=1, channels=8, T=33)
    q = _q(layer, 4).half()
    ref = attention.decode_attention_reference(layer, q)
    assert _err(attention.decode_attention(layer, q), ref) < 1e-3


def test_refuses_what_it_cannot_read(attention):
    from quantkit.kvcache.layers import KIVILayer

    with pytest.raises(TypeError, match="CQ cache layer"):
        attention.decode_attention(KIVILayer(bits=2, group_size=8, value_group=8, residual=0, sink=0),
                                   torch.zeros(1, 2, 8))
    layer = _layer(bits=2, channels=4, T=20)
    with pytest.raises(ValueError, match="one token per sequence"):
        attention.decode_attention(layer, torch.zeros(2, 4, 1, 32))
