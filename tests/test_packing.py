import pytest
import torch

from quantkit.formats.packing import SUPPORTED_BITS, pack_bits, pack_codes, packed_words, unpack_bits, unpack_codes


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (5, 32), (7, 33), (4, 576), (2, 1536), (2, 3, 100)])
def test_round_trip_exact(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[-1])
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64).to(torch.uint8)
    words = pack_codes(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (*shape[:-1], packed_words(shape[-1], bits))
    assert torch.equal(unpack_codes(words, bits, shape[-1]), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_extreme_codes(bits):
    for v in (0, 2**bits - 1):
        codes = torch.full((2, 64), v, dtype=torch.uint8)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 64), codes)


def test_layout_is_little_endian_bitstream():
    # 3-bit: value 10 straddles words 0 and 1 (bits 30..32), as in GPTQ's 3-bit layout.
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b111
    w = pack_codes(codes, 3)
    assert w.shape == (1, 3)
    assert (int(w[0, 0]) & 0xFFFFFFFF) == 0b11 << 30
    assert int(w[0, 1]) == 0b1
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert (int(pack_codes(codes, 4)[0, 0]) & 0xFFFFFFFF) == 0x87654321


def test_errors():
    with pytest.raises(ValueError, match="unsupported bit width"):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.full((1, 4), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_codes(torch.zeros(1, 2, dtype=torch.int32), 4, 100)


def _read_bitstream(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The layout's definition, one value at a time: value i is bits [i*bits, (i+1)*bits) of the row's stream."""
    out = torch.zeros(words.shape[0], n, dtype=torch.uint8)
    for r in range(words.shape[0]):
        stream = sum((int(v) & 0xFFFFFFFF) << (32 * j) for j, v in enumerate(words[r].tolist()))
        for i in range(n):
            out[r, i] = (stream >> (i * bits)) & (2**bits - 1)
    return out


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n", [5, 32, 64, 100])
def test_unpack_reads_any_words_as_the_bitstream(bits, n):
    # Arbitrary words, sign bits included (the vectorized unpack shifts arithmetically and must mask the sign out).
    g = torch.Generator().manual_seed(bits * 7 + n)
    words = torch.randint(-(2**31), 2**31, (3, packed_words(n, bits)), generator=g, dtype=torch.int64).to(torch.int32)
    assert torch.equal(unpack_codes(words, bits, n), _read_bitstream(words, bits, n))


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("shape", [(1, 1), (3, 31), (4, 144), (2, 3, 97)])
def test_any_width_round_trip_exact(bits, shape):
    g = torch.Generator().manual_seed(bits * 7 + shape[-1])
    codes = torch.randint(0, 2**bits, shape, generator=g, dtype=torch.int64)
    codes.view(-1)[0] = 2**bits - 1  # the top bit set
    words = pack_bits(codes, bits)
    assert words.shape == (*shape[:-1], packed_words(shape[-1], bits))
    assert torch.equal(unpack_bits(words, bits, shape[-1]), codes)
    if bits in SUPPORTED_BITS:
        assert torch.equal(words, pack_codes(codes, bits))
    with pytest.raises(ValueError, match="out of range"):
        pack_bits(torch.full((1, 3), 2**bits), bits)
