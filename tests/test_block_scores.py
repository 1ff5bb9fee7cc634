"""Block-measured sensitivity scores (``FitConfig.scores="block"``) against a whole-model reference."""

from __future__ import annotations

from dataclasses import replace

import torch
from safetensors.torch import load_file

from windquant.actions import ACTIONS, SKIP
from windquant.model.units import decoder_blocks
from windquant.pack.apply import plan_weights
from windquant.pipeline import prepare


def block_error(model, layer: int, windows, reference_out, fisher, units, weight) -> float:
    """Σ_c F_c (y_c − y_ref,c)² per token at block ``layer``'s output, the whole model run with
    ``units`` computing with ``weight(u)`` (plain forward, hooked)."""
    _prefix, blocks = decoder_blocks(model)
    seen = []
    hook = blocks[layer].register_forward_hook(lambda _m, _i, o: seen.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad(), plan_weights(model, units, weight):
        model(input_ids=windows)
    hook.remove()
    return float(((seen[0] - reference_out) ** 2 * fisher).sum() / windows.numel())


def test_each_linears_block_scores_sum_to_its_measured_block_error_and_keep_the_fisher_shares(tiny_model, tokenizer, tiny_fit):
    fisher_scores = prepare(tiny_model, tokenizer, tiny_fit, needs={"scores"}, progress=False).scores
    prepared = prepare(tiny_model, tokenizer, replace(tiny_fit, scores="block"), needs={"scores"}, progress=False)
    scores = prepared.scores
    assert load_file(str(prepared.folder / "scores.safetensors"))["scores"].equal(fisher_scores)  # the Fisher table stays
    windows = prepared.stats.windows  # 4 windows: all of them are measured
    residual = prepared.residual_fisher(progress=False)
    _prefix, blocks = decoder_blocks(tiny_model)
    outputs = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: outputs.append(o[0] if isinstance(o, tuple) else o)) for b in blocks]
    with torch.no_grad():
        tiny_model(input_ids=windows)
    for h in hooks:
        h.remove()
    by_module: dict[str, list] = {}
    for u in prepared.units:
        by_module.setdefault(u.module, []).append(u)
    cache = prepared.cache
    for module, units in by_module.items():
        layer = units[0].layer
        idx = [u.index for u in units]
        sixteen = block_error(tiny_model, layer, windows, outputs[layer], residual[layer], prepared.units, lambda u: cache.weight(u.index, SKIP))
        for col, action in enumerate(ACTIONS):
            if action == SKIP:
                assert scores[idx, col].eq(0).all()
                continue

            def weight(u, action=action, idx=set(idx)):
                return cache.weight(u.index, action if u.index in idx else SKIP)  # no fallback: the raw candidate

            measured = max(block_error(tiny_model, layer, windows, outputs[layer], residual[layer], prepared.units, weight) - sixteen, 0.0)
            total = float(scores[idx, col].sum())
            assert abs(total - measured) <= 1e-2 * measured + 1e-9, (module, action, total, measured)  # float32 differences of small errors
            shares = fisher_scores[idx, col] / fisher_scores[idx, col].sum()
            torch.testing.assert_close(scores[idx, col] / max(total, 1e-300), shares, rtol=1e-6, atol=1e-9)
    # Reloaded from the cache folder: the same table, no measurement.
    again = prepare(tiny_model, tokenizer, replace(tiny_fit, scores="block"), needs={"scores"}, progress=False)
    assert again.scores.equal(scores)
