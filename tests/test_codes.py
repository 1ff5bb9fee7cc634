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
