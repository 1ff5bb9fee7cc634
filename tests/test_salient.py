import torch

from windquant.quant import salient


def test_select_matches_brute_force_top_k():
    gen = torch.Generator().manual_seed(0)
    w, s = torch.randn(20, 50, generator=gen), torch.rand(50, generator=gen)
    mask = salient.select(w, s, 0.05)
    k = round(0.05 * 1000)
    assert int(mask.sum()) == k == salient.n_salient(20, 50, 0.05)
    score = (w.abs() * s).flatten()
    brute = set(sorted(range(1000), key=lambda i: -float(score[i]))[:k])
    assert set(mask.flatten().nonzero().flatten().tolist()) == brute


def test_row_cap_for_wide_units():
    w = torch.zeros(2, 300)
    w[0] = 10.0  # row 0 dominates every score
    mask = salient.select(w + 0.01 * torch.rand(2, 300), torch.ones(300), 0.6)
    assert int(mask[0].sum()) <= salient.MAX_PER_ROW
    assert int(mask.sum()) == salient.n_salient(2, 300, 0.6)


def test_pack_scatter_roundtrip_within_int8_step():
    gen = torch.Generator().manual_seed(1)
    w, s = torch.randn(8, 300, generator=gen), torch.rand(300, generator=gen)
    mask = salient.select(w, s, 0.1)
    sal = salient.pack(w, mask)
    assert sal.columns.dtype == torch.int16 and int(sal.counts.sum()) == int(mask.sum())
    restored = salient.scatter(torch.zeros_like(w), sal)
    step = float(sal.scale)
    assert (restored[mask] - w[mask]).abs().max() <= step / 2 + 1e-6
    assert (restored[~mask] == 0).all()
