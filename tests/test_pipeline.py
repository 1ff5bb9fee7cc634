import json
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from windquant import Plan, PlanConfig, load, quantize_, save
from windquant.actions import ACTIONS
from windquant.calib.statistics import calibrate
from windquant.pipeline import make_plan, prepare


def data_bytes_by_tensor(path):
    """Byte length of every tensor in a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}


def test_quantize_save_load_roundtrip(tiny_model, tokenizer, tiny_plan, tiny_fit, tmp_path):
    plan, timings = quantize_(tiny_model, tokenizer, tiny_plan, tiny_fit, progress=False)
    assert plan.true_bits <= tiny_plan.target_bits
    assert set(timings) == {"calibrate", "fit", "scores", "choose scores", "allocate", "apply"}  # ilp (default) needs scores; auto chooses
    out = save(tiny_model, tokenizer, plan, tmp_path / "ckpt")
    loaded = load(out, runtime=False)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(tiny_model(x).logits, loaded(x).logits)
    # bytes on disk of the quantized layers == the true-bits accounting
    sizes = data_bytes_by_tensor(out / "model.safetensors")
    qconf = json.loads((out / "quant_config.json").read_text())
    packed = sum(v for k, v in sizes.items() if k.startswith(tuple(m + ".c" for m in qconf["modules"])))
    assert packed * 8 == plan.summary().true_bits_total
    assert json.loads((out / "plan.json").read_text())["true_bits"] == pytest.approx(plan.true_bits)
    # generate() works on the reloaded model
    assert loaded.generate(x[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_quantized_model_differs_from_reference_but_stays_close(tiny_model, tokenizer, tiny_plan, tiny_fit):
    from conftest import make_model

    ref = make_model()
    tiny_plan.target_bits = 9.0  # mostly 8 bit
    quantize_(tiny_model, tokenizer, tiny_plan, tiny_fit, progress=False)
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        a, b = ref(x).logits, tiny_model(x).logits
    assert not torch.equal(a, b)
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_plan_json_roundtrip_and_applied_actions(tiny_model, tokenizer, tiny_plan, tiny_fit, tmp_path):

    prepared = prepare(tiny_model, tokenizer, tiny_fit, progress=False)
    plan = make_plan(prepared, tiny_plan)
    # threshold 0: every low-bit request falls back to 8 bit, and the Plan records it
    strict = prepare(tiny_model, tokenizer, replace(tiny_fit, fallback_threshold=0.0), progress=False)
    plan2 = make_plan(strict, PlanConfig(target_bits=16.0, allocator="uniform", allocator_config={"action": 2.0}))
    assert set(plan2.requested) == {2.0} and set(plan2.applied) == {8.0}
    plan2.save(tmp_path / "p.json")
    back = Plan.load(tmp_path / "p.json")
    assert back.applied == plan2.applied and back.requested == plan2.requested and back.units == plan2.units
    assert back.true_bits == pytest.approx(plan2.true_bits)
    assert plan.true_bits <= tiny_plan.target_bits
    assert plan2.fallback_threshold == 0.0 and plan.fallback_threshold == tiny_fit.fallback_threshold


def test_candidate_cache_is_reused_from_disk(tiny_model, tokenizer, tiny_fit):
    first = prepare(tiny_model, tokenizer, tiny_fit, progress=False)
    shards = sorted(first.folder.glob("layer_*.safetensors"))
    written = [p.stat().st_mtime_ns for p in shards]
    second = prepare(tiny_model, tokenizer, tiny_fit, progress=False)
    assert len(shards) == 2 and [p.stat().st_mtime_ns for p in shards] == written  # read, not refitted
    for u in first.units:
        for a in ACTIONS:
            packed = first.cache.packed_of(u.index, a)
            assert packed and packed.keys() == second.cache.packed_of(u.index, a).keys()
            assert all(torch.equal(t, second.cache.packed_of(u.index, a)[k]) for k, t in packed.items())
    assert first.cache.errors == second.cache.errors and first.cache.traces == second.cache.traces


def test_cache_holds_dense_candidates_only_for_allocators_that_score_plans(tiny_model, tokenizer, tiny_fit):
    """ilp needs only the tables: no dense candidates in RAM; a proxy (RL) allocator holds them all,
    and they equal what is unpacked on demand."""
    lean = prepare(tiny_model, tokenizer, tiny_fit, needs={"scores"}, progress=False)
    assert lean.cache.dense == {}
    rl = prepare(tiny_model, tokenizer, tiny_fit, needs={"proxy"}, progress=False)
    assert set(rl.cache.dense) == {(u.index, a) for u in rl.units for a in ACTIONS}
    for index, action in rl.cache.dense:
        assert torch.equal(rl.cache.dense[(index, action)], lean.cache.weight(index, action))
    # on disk: written once beside the cache, memory-mapped, the same weights
    mapped = prepare(tiny_model, tokenizer, replace(tiny_fit, dense_candidates="disk"), needs={"proxy"}, progress=False)
    assert len(list(mapped.folder.glob("dense_*.safetensors"))) == 2
    assert mapped.cache.dense.keys() == rl.cache.dense.keys()
    assert all(torch.equal(t, rl.cache.dense[k]) for k, t in mapped.cache.dense.items())


def test_plan_weights_equal_packed_model_and_restore(tiny_model, tokenizer, tiny_plan, tiny_fit):
    """Scoring a plan from the dense cache gives the same logits as the packed model."""
    from conftest import make_model

    from windquant.pack.apply import apply_plan, plan_weights
    from windquant.pack.qlinear import QuantLinear

    prepared = prepare(tiny_model, tokenizer, tiny_fit, progress=False)
    plan = make_plan(prepared, tiny_plan)
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        before = tiny_model(x).logits
        dense = {u.index: prepared.cache.weight(u.index, a) for u, a in zip(plan.units, plan.applied)}
        with plan_weights(tiny_model, plan.units, lambda u: dense[u.index]):
            assembled = tiny_model(x).logits
        assert torch.equal(tiny_model(x).logits, before)  # restored
        packed = apply_plan(make_model(), plan, prepared.cache.packed_of)
        reference = packed(x).logits
        cached = apply_plan(make_model(), plan, prepared.cache.packed_of, dense_cache=True)
        assert torch.equal(cached(x).logits, reference)  # the kept dense weights are the same values
        assert all(m._weight is not None for m in cached.modules() if isinstance(m, QuantLinear))
    # apply_plan also rounds embeddings/norms to fp16; tolerance covers that alone
    assert torch.allclose(assembled, reference, atol=1e-2, rtol=1e-3)
    assert not torch.allclose(assembled, before, atol=1e-3)


def test_error_feedback_candidates_cut_the_output_error(tiny_model, tokenizer, tiny_fit):
    plain = prepare(tiny_model, tokenizer, replace(tiny_fit, feedback=False, rotate=False, carry=False), progress=False)
    fed = prepare(tiny_model, tokenizer, replace(tiny_fit, feedback=True, rotate=False, carry=False), progress=False)
    assert fed.folder != plain.folder
    # the scales come from the same pass either way
    assert all(torch.equal(plain.stats.act_scales[k], fed.stats.act_scales[k]) for k in plain.stats.act_scales)
    moments = calibrate(tiny_model, fed.stats.windows, moments=True, progress=False).moments

    def output_error(prepared, action):
        total = 0.0
        for u in prepared.units:
            w = tiny_model.get_submodule(u.module).weight.detach()[:, u.col0 : u.col1].double()
            h = moments[u.module][u.col0 : u.col1, u.col0 : u.col1].double()
            d = w - prepared.cache.weight(u.index, action).double()
            total += float(((d @ h) * d).sum())
        return total

    for action in (4.0, 2.0):
        assert output_error(fed, action) < output_error(plain, action)


def test_loaded_model_stays_packed_unless_dense_cache(tiny_model, tokenizer, tiny_plan, tiny_fit, tmp_path):
    from windquant.pack.qlinear import QuantLinear

    plan, _ = quantize_(tiny_model, tokenizer, tiny_plan, tiny_fit, progress=False)
    out = save(tiny_model, tokenizer, plan, tmp_path / "ckpt")
    packed, dense = load(out, runtime=False), load(out, dense_cache=True)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(packed(x).logits, dense(x).logits)
        assert torch.equal(packed(x).logits, tiny_model(x).logits)
    layers = [m for m in packed.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m._weight is None for m in layers)  # nothing dense kept after a forward
    assert all(m._weight is not None for m in dense.modules() if isinstance(m, QuantLinear))


def test_a_tuned_run_stores_the_same_weights_from_a_warm_cache_and_from_a_fresh_one(tokenizer, tiny_fit, tmp_path):
    """Bit-reproducible runs: the candidate cache (written by the first run, read by the second)
    and a fresh cache lead to identical stored weights, scale tuning included."""
    from conftest import make_model

    from windquant.pipeline import apply

    def stored_weights(fit):
        model = make_model()
        prepared = prepare(model, tokenizer, fit, progress=False)
        plan = make_plan(prepared, PlanConfig(target_bits=2.5), progress=False)
        assert plan.tune_steps == fit.tune_steps
        apply(prepared, plan, progress=False)
        return model.state_dict()

    fit = replace(tiny_fit, calib_samples=8, tune_steps=20, tune_lr=5e-3)
    cold = stored_weights(fit)
    assert any(p.is_file() for p in Path(fit.cache_dir).rglob("*"))  # the second run reads what the first wrote
    for other in (stored_weights(fit), stored_weights(replace(fit, cache_dir=str(tmp_path / "fresh")))):
        assert cold.keys() == other.keys()
        assert all(torch.equal(cold[k], other[k]) for k in cold)
