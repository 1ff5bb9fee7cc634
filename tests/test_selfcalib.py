"""--calib self: the model's own text, seeded, cached, and mixed with real text (mix+self)."""

import pytest
import torch
from conftest import make_model

from windquant.calib import selfgen
from windquant.calib.selfgen import T_FINAL, T_INITIAL, T_STEPS, generate, pick, self_tokens, temperature
from windquant.errors import WindquantError


def reference_generate(model, start, n, length, seed, batch):
    """Reference (slow, obvious): no KV cache, the whole prefix run again at every step; the
    same batches drawing from one seeded generator in the same order."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for b0 in range(0, n, batch):
            seqs = torch.full((min(batch, n - b0), 1), start)
            for step in range(length - 1):
                logits = model(input_ids=seqs).logits[:, -1].float()
                seqs = torch.cat([seqs, torch.multinomial(torch.softmax(logits / temperature(step), -1), 1, generator=gen)], 1)
            out.append(seqs)
    return torch.cat(out)


def test_temperature_schedule_cools_linearly_then_holds():
    assert temperature(0) == T_INITIAL and temperature(T_STEPS) == pytest.approx(T_FINAL) and temperature(10 * T_STEPS) == pytest.approx(T_FINAL)
    mid = temperature(T_STEPS // 2)
    assert mid == pytest.approx((T_INITIAL + T_FINAL) / 2)


def test_batched_sampling_with_the_kv_cache_matches_the_reference(monkeypatch):
    model = make_model().double()  # float64: the cached and uncached logits agree to ~1e-15
    monkeypatch.setattr(selfgen, "BATCH", 3)  # two batches, the second one short
    got = generate(model, 0, 5, 12, seed=7)
    assert got.shape == (5, 12) and (got[:, 0] == 0).all()
    assert torch.equal(got, reference_generate(model, 0, 5, 12, 7, batch=3))
    assert not torch.equal(got, generate(model, 0, 5, 12, seed=8))


def test_self_tokens_are_seeded_and_generated_once(tmp_path, tokenizer, monkeypatch):
    calls = []
    real = selfgen.generate
    monkeypatch.setattr(selfgen, "generate", lambda *a, **k: calls.append(a[2:]) or real(*a, **k))
    a = self_tokens(make_model(), tokenizer, 4, 16, seed=0, cache_root=tmp_path, progress=False)
    assert a.shape == (4, 16) and len(calls) == 1
    assert (a[:, 0] == tokenizer.eos_token_id).all()  # no BOS in this tokenizer: starts from EOS
    # Another model object with the same weights (a new process, say): read from the cache.
    b = self_tokens(make_model(), tokenizer, 4, 16, seed=0, cache_root=tmp_path, progress=False)
    assert torch.equal(a, b) and len(calls) == 1
    assert len(list((tmp_path / "selfcalib").glob("*.safetensors"))) == 1
    c = self_tokens(make_model(), tokenizer, 4, 16, seed=1, cache_root=tmp_path, progress=False)
    assert len(calls) == 2 and not torch.equal(a, c)
    d = self_tokens(make_model(seed=5), tokenizer, 4, 16, seed=0, cache_root=tmp_path, progress=False)
    assert len(calls) == 3 and not torch.equal(a, d)  # other weights: other text


def test_pick_cuts_seeded_rows_from_their_start():
    pool = torch.arange(10 * 8).reshape(10, 8)
    calib = pick(pool, 4, 5, seed=0)
    assert torch.equal(calib, pick(pool, 4, 5, seed=0)) and not torch.equal(calib, pick(pool, 4, 5, seed=1))
    assert calib.shape == (4, 5) and all(int(r[0]) % 8 == 0 for r in calib) and len({int(r[0]) for r in calib}) == 4
    with pytest.raises(WindquantError, match="fewer than 11 windows"):
        pick(pool, 11, 5, seed=1)
    with pytest.raises(WindquantError, match="--calib-len"):
        pick(pool, 2, 9, seed=0)


def test_mix_plus_self_windows_take_equal_shares(tiny_fit, tokenizer):
    from dataclasses import replace

    from windquant.pipeline import calibration_windows, heldout_windows

    model = make_model()
    fit = replace(tiny_fit, calib="mix+self")
    windows = calibration_windows(tokenizer, fit, model=model)
    assert windows.shape == (4, 32)
    self_fit = replace(tiny_fit, calib="self", calib_samples=2)
    alone = calibration_windows(tokenizer, self_fit, model=model)
    assert torch.equal(windows[2:], alone)  # the self share is what self alone gives for 2 windows
    mix_fit = replace(tiny_fit, calib="mix", calib_samples=2)
    assert torch.equal(windows[:2], calibration_windows(tokenizer, mix_fit))
    held = heldout_windows(tokenizer, fit, 6, 32, model)
    assert held.shape == (6, 32)
    assert not {tuple(r.tolist()) for r in held[3:]} & {tuple(r.tolist()) for r in windows[2:]}  # other sequences
    with pytest.raises(WindquantError, match="needs the model"):
        calibration_windows(tokenizer, fit)
