import math

import pytest
import torch

from windquant.quant.codes import pack_codes, packed_code_bytes, unpack_codes


@pytest.mark.parametrize("levels", [2, 3, 4, 8, 16, 256])
@pytest.mark.parametrize("n", [1, 5, 7, 64, 1001])
def test_pack_roundtrip_and_size(levels, n):
    codes = torch.randint(0, levels, (n,), generator=torch.Generator().manual_seed(n))
    packed = pack_codes(codes, levels)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_code_bytes(levels, n)
    assert torch.equal(unpack_codes(packed, levels, n), codes)


def test_packed_sizes_hand_computed():
    assert packed_code_bytes(3, 10) == 2  # five trits per byte
    assert packed_code_bytes(3, 11) == 3
    assert packed_code_bytes(8, 8) == 3  # 3-bit codes: 24 bits
    assert packed_code_bytes(2, 9) == 2
    assert packed_code_bytes(16, 3) == math.ceil(12 / 8)


def bitstream_reference(codes: list[int], bits: int) -> bytes:
    """Slow, obvious: code i's bit j is bit i·bits + j of a little-endian stream, zero-padded."""
    stream = [(c >> j) & 1 for c in codes for j in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return bytes(sum(stream[k + j] << j for j in range(8)) for k in range(0, len(stream), 8))


@pytest.mark.parametrize("levels", [2, 4, 8, 16, 32, 128, 256])
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 64, 1001])
def test_packed_bytes_are_the_little_endian_bitstream(levels, n):
    codes = torch.randint(0, levels, (n,), generator=torch.Generator().manual_seed(levels + n))
    bits = math.ceil(math.log2(levels))
    assert bytes(pack_codes(codes, levels).tolist()) == bitstream_reference(codes.tolist(), bits)


def test_packed_bytes_hand_computed():
    # 3-bit codes 1..7, 0: 1 + 2·8 + 3·8² + … + 7·8⁶ = 2054353 = 0x1F58D1, little-endian.
    assert pack_codes(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 8).tolist() == [0xD1, 0x58, 0x1F]
    assert pack_codes(torch.tensor([1, 2, 0, 1, 2]), 3).tolist() == [1 + 2 * 3 + 0 + 1 * 27 + 2 * 81]
