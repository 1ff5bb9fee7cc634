import pytest
import torch

from windquant.actions import ACTIONS, LOW_BIT_ACTIONS
from windquant.quant.accounting import summarize, unit_layout, unit_paper_bits, unit_true_bits
from windquant.quant.ops import GRIDS
from windquant.quant.unit import FitSettings, quantize_unit


def test_paper_bits_eq6_hand_computed():
    # 10 x 100 unit, 3% salient -> 30 protected, 970 quantized
    assert unit_paper_bits(2.0, 10, 100, 0.03) == 2 * 970 + 8 * 30
    assert unit_paper_bits(16.0, 10, 100, 0.03) == 16 * 1000
    assert unit_paper_bits(8.0, 10, 100, 0.03) == 8 * 1000  # INT8 needs no protection


def test_true_bits_hand_computed():
    # 2 bit: codes ceil(970*2/8)=243 B, scale 10*2 B, salient 30 val + 30 col + 10 counts + 2 scale
    assert unit_true_bits(2.0, 10, 100, 0.03) == 8 * (243 + 20 + 30 + 30 + 10 + 2)
    # 1 bit adds the elastic shift: codes ceil(970/8)=122 B
    assert unit_true_bits(1.0, 10, 100, 0.03) == 8 * (122 + 20 + 20 + 30 + 30 + 10 + 2)
    # ternary: ceil(970/5)=194 B
    assert unit_true_bits(1.58, 10, 100, 0.03) == 8 * (194 + 20 + 30 + 30 + 10 + 2)
    # wide unit: uint16-sized column indices
    assert unit_layout(2.0, 4, 300, 0.03)["sal_col"][0] == torch.int16


@pytest.mark.parametrize("action", ACTIONS)
@pytest.mark.parametrize("shape", [(16, 32), (24, 20), (7, 300)])
def test_packed_tensors_match_the_accounting_table(action, shape):
    w = torch.randn(*shape)
    packed = quantize_unit(w, torch.rand(shape[1]) + 0.1, action, FitSettings(steps=1))
    assert 8 * sum(t.numel() * t.element_size() for t in packed.values()) == unit_true_bits(action, *shape, 0.03)


def test_summary_averages():
    s = summarize([(10, 100), (10, 100)], [16.0, 8.0], 0.03)
    assert s.paper_bits == pytest.approx(12.0)
    assert s.true_bits > s.paper_bits  # scales are counted


def test_one_operator_per_low_bit_action():
    assert tuple(GRIDS) == LOW_BIT_ACTIONS and ACTIONS[0] == 16.0
