"""GGUF output: sizes, the knapsack, the costs, the imatrix file, and `windquant gguf` end to end on
a tiny random GGUF (gguf-py writer; the llama.cpp writer when `make llamacpp` has been run)."""

import itertools
import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from windquant.cli import main
from windquant.gguf import llamacpp
from windquant.gguf.files import dequantized, open_gguf, quantized_bytes, write_gguf, write_imatrix, write_random_llama
from windquant.gguf.recipe import choose, trace_cost
from windquant.gguf.types import PYTHON_TYPES, bits_per_weight, fits, tensor_bytes

TINY = ["--calib-samples", "4", "--calib-len", "32", "--quiet"]


@pytest.mark.parametrize("qtype", PYTHON_TYPES)
def test_size_table_equals_the_bytes_gguf_py_writes(qtype):
    w = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32)
    assert quantized_bytes(w, qtype).nbytes == tensor_bytes(qtype, 3, 96)
    assert tensor_bytes(qtype, 3, 96) * 8 / (3 * 96) == bits_per_weight(qtype)


def test_fits_follows_block_sizes():
    assert fits(T.Q4_0, 576) and not fits(T.Q4_K, 576) and fits(T.Q4_K, 1536)
    assert bits_per_weight(T.Q4_K) == 4.5 and bits_per_weight(T.Q2_K) == 2.625


def test_knapsack_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        costs = [list(rng.random(rng.integers(1, 4))) for _ in range(5)]
        sizes = [list(rng.integers(1, 10, len(c))) for c in costs]
        budget = int(rng.integers(sum(min(s) for s in sizes), sum(max(s) for s in sizes) + 1))
        best = min(
            (sum(c[k] for c, k in zip(costs, pick, strict=True)), pick)
            for pick in itertools.product(*(range(len(c)) for c in costs))
            if sum(s[k] for s, k in zip(sizes, pick, strict=True)) <= budget
        )
        picks = choose(costs, sizes, budget)
        assert sum(s[k] for s, k in zip(sizes, picks, strict=True)) <= budget
        assert sum(c[k] for c, k in zip(costs, picks, strict=True)) == pytest.approx(best[0])


def test_trace_cost_is_the_weighted_squared_error():
    rng = np.random.default_rng(2)
    w, q = rng.standard_normal((4, 6)), rng.standard_normal((4, 6))
    x = rng.standard_normal((50, 6))
    m = torch.from_numpy(x.T @ x / 50)
    # Σ over rows and tokens of the output error (ΔW x)², averaged over tokens.
    expected = float(np.mean(np.sum(((w - q) @ x.T) ** 2, axis=0)))
    assert trace_cost(w, q, m) == pytest.approx(expected)


def test_imatrix_file_layout(tmp_path):
    vals = {"blk.0.attn_q.weight": np.array([1.0, 2.5], np.float32), "blk.0.ffn_down.weight": np.array([3.0], np.float32)}
    path = tmp_path / "m.dat"
    write_imatrix(path, vals, "corpus", chunks=7)
    raw = path.read_bytes()
    expected = struct.pack("<i", 2)
    expected += struct.pack("<i", 19) + b"blk.0.attn_q.weight" + struct.pack("<iiff", 1, 2, 1.0, 2.5)
    expected += struct.pack("<i", 21) + b"blk.0.ffn_down.weight" + struct.pack("<iif", 1, 1, 3.0)
    expected += struct.pack("<ii", 7, 6) + b"corpus"
    assert raw == expected


def _logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_gguf_cli_writes_a_file_transformers_reads_as_we_dequantize_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WINDQUANT_LLAMACPP", str(tmp_path / "no-llamacpp"))  # the gguf-py writer, as in CI
    src = write_random_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "q.gguf"
    args = ["gguf", "--model", str(src), "--target-bpw", "5", "--out", str(out), "--work-dir", str(tmp_path / "w")]
    assert main(args + TINY) == 0
    report = json.loads((tmp_path / "q.gguf.json").read_text())
    assert report["writer"] == "gguf-py" and report["linear_bpw"] <= 5.0
    assert len(report["type_counts"]) >= 2  # a real mix at a budget between the types
    assert "5.0000 bpw" in capsys.readouterr().out

    # Our dequantization of the written file, stored as plain F32 next to it.
    written = open_gguf(out)
    f32 = {t.name: (dequantized(t), T.F32) for t in written.tensors}
    plain = tmp_path / "plain.gguf"
    write_gguf(written, plain, f32, progress=False)
    quantized = [t for t in written.tensors if t.tensor_type in PYTHON_TYPES]
    assert len(quantized) == 15  # 14 block linears and the embedding
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    assert torch.allclose(_logits(out, ids), _logits(plain, ids), atol=1e-5, rtol=0)
    assert not torch.allclose(_logits(out, ids), _logits(src, ids), atol=1e-3)  # it is really quantized

    # The same recipe again comes from the work folder's cached costs.
    again = tmp_path / "again.gguf"
    assert main(args[:-4] + ["--out", str(again), "--work-dir", str(tmp_path / "w")] + TINY) == 0
    assert json.loads((tmp_path / "again.gguf.json").read_text())["types"] == report["types"]
    capsys.readouterr()
    dry = ["gguf", "--model", str(src), "--target-bpw", "5", "--dry-run", "--work-dir", str(tmp_path / "w")]
    assert main(dry + TINY) == 0
    printed = capsys.readouterr().out
    assert f"blk.0.attn_q.weight {report['types']['blk.0.attn_q.weight']}" in printed and "file" not in printed


def _error(argv, capsys, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1].split("\r")[-1]  # after any progress bar
    assert err.startswith("windquant: error:") and needle in err


def test_gguf_bad_input(tmp_path, monkeypatch, capsys, tiny_model_dir):
    monkeypatch.setenv("WINDQUANT_LLAMACPP", str(tmp_path / "no-llamacpp"))
    src = write_random_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "q.gguf"
    base = ["gguf", "--model", str(src), "--out", str(out), "--work-dir", str(tmp_path / "w"), *TINY]
    _error([*base, "--target-bpw", "4.0"], capsys, "below the cheapest valid types (4.5000 bits per weight)")
    _error([*base, "--target-bpw", "5", "--embedding-type", "Q4_K"], capsys, "make llamacpp")
    _error([*base, "--target-bpw", "5", "--types", "Q4_K"], capsys, "none of the --types can be written by gguf-py")
    _error([*base, "--target-bpw", "5", "--types", "Q9_9"], capsys, "unknown GGUF tensor type")
    _error(["gguf", "--model", str(tiny_model_dir), "--target-bpw", "5", "--out", str(out)], capsys, "needs a GGUF model")
    assert not out.exists() and not list(tmp_path.glob(".q.gguf*"))


@pytest.mark.skipif(llamacpp.find_tool("llama-quantize") is None, reason="llama.cpp not built: run `make llamacpp`")
def test_llamacpp_writer_exercises_k_quants_and_matches_its_recipe(tmp_path):
    src = write_random_llama(tmp_path / "tiny256.gguf", hidden=256, intermediate=512)
    out = tmp_path / "k.gguf"
    args = ["gguf", "--model", str(src), "--target-bpw", "3", "--out", str(out), "--work-dir", str(tmp_path / "w"), *TINY]
    assert main(args) == 0  # the writer checks every tensor's type and bytes against the recipe
    report = json.loads((tmp_path / "k.gguf.json").read_text())
    assert report["writer"] == "llama.cpp" and report["linear_bpw"] <= 3.0
    assert any(gguf.GGML_QUANT_SIZES[T[name]][0] == 256 for name in report["type_counts"])


def test_export_gguf_writes_the_checkpoints_own_weights(tmp_path, monkeypatch, capsys, tiny_model_dir):
    from windquant.runtime.loading import load_model

    monkeypatch.setenv("WINDQUANT_LLAMACPP", str(tmp_path / "no-llamacpp"))
    src = write_random_llama(tmp_path / "tiny.gguf")
    ck = tmp_path / "ck"
    fit = ["--chunk", "32", "--calib-samples", "4", "--calib-len", "32", "--steps", "3", "--cache-dir", str(tmp_path / "c")]
    # A 16-bit embedding: 8-bit rows dequantized (int8 x fp16 scale) are not all representable in F16.
    assert main(["quantize", "--model", str(src), *fit, "--target-bits", "3", "--embedding-bits", "16", "--out", str(ck), "--quiet"]) == 0
    work = ["--work-dir", str(tmp_path / "w"), "--quiet"]
    # As F16 the export is exactly the checkpoint's weights, rows back in GGUF order (Q/K permuted).
    f16 = tmp_path / "f16.gguf"
    assert main(["export-gguf", str(ck), "--out", str(f16), "--types", "F16", "--embedding-type", "F16", *work]) == 0
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    packed, _ = load_model(str(ck), runtime=False)
    with torch.no_grad():
        assert torch.allclose(_logits(f16, ids), packed(ids).logits, atol=1e-5, rtol=0)
    # Its 3 true bits have no GGUF type on 64-wide rows: the nearest (Q4_0) and a plain note.
    q = tmp_path / "q.gguf"
    assert main(["export-gguf", str(ck), "--out", str(q), *work]) == 0
    report = json.loads((tmp_path / "q.gguf.json").read_text())
    assert report["type_counts"] == {"Q4_0": 14} and not report["within_checkpoint_bytes"]
    assert "above the checkpoint's bytes" in capsys.readouterr().out
    _error(["export-gguf", str(tmp_path), "--out", str(tmp_path / "x.gguf"), *work], capsys, "not a windquant checkpoint")
    hf_ck = tmp_path / "hf-ck"
    assert main(["quantize", "--model", str(tiny_model_dir), *fit, "--target-bits", "3", "--out", str(hf_ck), "--quiet"]) == 0
    _error(["export-gguf", str(hf_ck), "--out", str(tmp_path / "x.gguf"), *work], capsys, "needs a GGUF model")
    assert not (tmp_path / "x.gguf").exists()


def test_projection_keeps_within_the_checkpoint_bytes_when_types_allow():
    from windquant.gguf.export import project_types
    from windquant.gguf.recipe import TensorOptions

    opts = [TensorOptions(f"t{i}", 4, 64, {T.Q4_0: 0.0, T.Q5_0: 0.0, T.Q8_0: 0.0}) for i in range(3)]
    true = {"t0": 4.0, "t1": 6.0, "t2": 5.5}
    # Nearest alone would be Q4_0, Q5_0, Q5_0 (15.5 bits); at 15.0 one must step down, and moving
    # t2 (1.0² away) costs less than moving t1 (1.5² away).
    budget = 3 * 256 * 5 // 8
    recipe, within = project_types(opts, true, budget)
    assert within and recipe.linear_bytes <= budget
    assert [recipe.types[f"t{i}"] for i in range(3)] == [T.Q4_0, T.Q5_0, T.Q4_0]
    _, loose = project_types(opts, true, 3 * tensor_bytes(T.Q5_0, 4, 64))
    assert loose
    assert project_types(opts, true, 10)[1] is False  # below every type: nearest each, reported


def test_written_file_is_checked_against_its_recipe(tmp_path):
    from windquant.errors import WindquantError
    from windquant.gguf.build import check_written
    from windquant.gguf.recipe import Recipe

    src = open_gguf(write_random_llama(tmp_path / "tiny.gguf", layers=1))
    name = "blk.0.attn_q.weight"
    w = dequantized(next(t for t in src.tensors if t.name == name))
    out = tmp_path / "q.gguf"
    write_gguf(src, out, {name: (quantized_bytes(w, T.Q4_0), T.Q4_0)}, progress=False)
    right = Recipe({name: T.Q4_0}, tensor_bytes(T.Q4_0, 64, 64), 64 * 64, 0.0, 4.5)
    check_written(out, right)
    with pytest.raises(WindquantError, match="not the recipe's Q8_0"):
        check_written(out, Recipe({name: T.Q8_0}, tensor_bytes(T.Q8_0, 64, 64), 64 * 64, 0.0, 8.5))
    with pytest.raises(WindquantError, match="the recipe counted"):
        check_written(out, Recipe({name: T.Q4_0}, right.linear_bytes + 1, 64 * 64, 0.0, 4.5))


def test_candidate_recipes_add_the_knapsack_without_coarse_types():
    from windquant.gguf.recipe import ALL_TYPES, NO_COARSE, TensorOptions, candidate_recipes

    def options(costs):  # three 4 x 256 tensors; each option: type -> cost
        return [TensorOptions(f"t{i}", 4, 256, dict(c)) for i, c in enumerate(costs)]

    robust = {T.IQ2_XXS: 3.0, T.IQ3_XXS: 2.0, T.Q4_K: 1.0, T.Q8_0: 0.0}
    opts = options([robust, robust, {T.IQ2_XXS: 100.0, T.IQ3_XXS: 80.0, T.Q4_K: 60.0, T.Q8_0: 0.0}])
    target = (2 * bits_per_weight(T.IQ2_XXS) + bits_per_weight(T.Q8_0)) / 3  # the first two at 2 bits pay for one Q8_0
    plans = candidate_recipes(opts, target, coarse_bpw=3.0)
    assert set(plans) == {ALL_TYPES, NO_COARSE}
    assert sorted(t.name for t in plans[ALL_TYPES].types.values()) == ["IQ2_XXS", "IQ2_XXS", "Q8_0"]
    # Brute force over the types of at least 3 bits per weight within the same bytes.
    fine = [T.IQ3_XXS, T.Q4_K, T.Q8_0]
    best = min(
        (sum(o.costs[t] for o, t in zip(opts, pick, strict=True)), pick)
        for pick in itertools.product(fine, repeat=3)
        if sum(o.size(t) for o, t in zip(opts, pick, strict=True)) * 8 <= target * 3 * 4 * 256 + 1e-6
    )
    assert plans[NO_COARSE].cost == pytest.approx(best[0]) and plans[NO_COARSE].types["t2"] == best[1][2] == T.Q4_K
    assert plans[NO_COARSE].bpw <= target + 1e-9 and plans[NO_COARSE].cost >= plans[ALL_TYPES].cost
    assert set(candidate_recipes(opts, target, coarse_bpw=0.0)) == {ALL_TYPES}  # the check off
    assert set(candidate_recipes(opts, 8.5, coarse_bpw=3.0)) == {ALL_TYPES}  # no coarse type chosen
    low = (2 * bits_per_weight(T.IQ2_XXS) + bits_per_weight(T.IQ3_XXS)) / 3
    assert set(candidate_recipes(opts, low, coarse_bpw=3.0)) == {ALL_TYPES}  # nothing fits without them


def test_without_source_grids_drops_only_the_types_that_reproduce_a_quantized_source():
    from windquant.gguf.recipe import TensorOptions, without_source_grids

    def options(w: np.ndarray) -> TensorOptions:  # gguf-py's real round trips, identity moment
        moment = torch.eye(w.shape[1])
        costs = {q: trace_cost(w, gguf.quants.dequantize(quantized_bytes(w, q), q), moment) for q in PYTHON_TYPES}
        return TensorOptions("t", *w.shape, costs)

    fresh = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    stored_q4_1 = gguf.quants.dequantize(quantized_bytes(fresh, T.Q4_1), T.Q4_1)  # a source shipped as Q4_1
    stored = options(stored_q4_1)
    kept, dropped = without_source_grids([options(fresh), stored])
    assert dropped >= 1 and set(kept[0].costs) == set(PYTHON_TYPES)  # 16-bit weights lose nothing
    assert T.Q4_1 not in kept[1].costs and {T.Q4_0, T.Q5_0, T.Q8_0} <= set(kept[1].costs)
    assert stored.costs[T.Q4_1] < stored.costs[T.Q8_0]  # why: Q4_1 looked free


def test_recipe_check_keeps_the_recipe_with_lower_heldout_perplexity(tmp_path, monkeypatch):
    from windquant.config import FitConfig
    from windquant.eval.perplexity import perplexity
    from windquant.gguf.build import CHECK_WINDOWS, GGUFConfig, build_gguf
    from windquant.model.loading import read_gguf
    from windquant.pipeline import heldout_windows

    monkeypatch.setenv("WINDQUANT_LLAMACPP", str(tmp_path / "no-llamacpp"))  # gguf-py's types: Q4_0 (4.5) is the coarsest
    src = write_random_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "q.gguf"
    fit = FitConfig(calib="builtin", calib_samples=4, calib_len=32)
    report = build_gguf(str(src), out, GGUFConfig(target_bpw=5.0, coarse_bpw=5.0), fit, tmp_path / "w", progress=False)
    check = report["recipe_check"]
    assert set(check["heldout_ppl"]) == {"all types", "no coarse types"}
    assert "Q4_0" in check["type_counts"]["all types"] and check["type_counts"]["no coarse types"] == {"Q4_1": 14}
    assert check["chosen"] == min(check["heldout_ppl"], key=check["heldout_ppl"].get)
    assert report["type_counts"] == check["type_counts"][check["chosen"]]
    assert {t.name: t.tensor_type.name for t in open_gguf(out).tensors if t.name in report["types"]} == report["types"]
    # The kept file scores what the check recorded, recomputed from the file on the same windows.
    model, tok = read_gguf(out)
    windows = heldout_windows(tok, fit, CHECK_WINDOWS, fit.calib_len)
    assert perplexity(model, windows.reshape(-1), ctx=32, progress=False).ppl == pytest.approx(check["heldout_ppl"][check["chosen"]])
    assert not list(tmp_path.glob(".q.gguf*"))  # no candidate file left behind


def test_read_gguf_parses_the_file_once_and_loads_what_transformers_loads(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from windquant.model.loading import read_gguf

    src = write_random_llama(tmp_path / "tiny.gguf")
    parses = []
    parse = gguf.GGUFReader

    def counted(path, mode="r"):
        parses.append(path)
        return parse(path, mode)

    monkeypatch.setattr(gguf, "GGUFReader", counted)
    model, tok = read_gguf(src)
    assert len(parses) == 1 and gguf.GGUFReader is counted  # parsed once, the reader restored after
    # Reference: transformers on its own (a parse per part).
    plain_tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    plain = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    assert len(parses) >= 3
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert all(torch.equal(t, plain.state_dict()[k]) for k, t in model.state_dict().items())
    assert tok.get_vocab() == plain_tok.get_vocab() and tok("a b c").input_ids == plain_tok("a b c").input_ids


def _read_imatrix(path):
    """The legacy imatrix file of :func:`write_imatrix`: name -> values."""
    raw, pos, out = path.read_bytes(), 4, {}
    for _ in range(struct.unpack_from("<i", raw, 0)[0]):
        (n,) = struct.unpack_from("<i", raw, pos)
        name = raw[pos + 4 : pos + 4 + n].decode()
        _calls, count = struct.unpack_from("<ii", raw, pos + 4 + n)
        out[name] = np.frombuffer(raw, np.float32, count, pos + 12 + n)
        pos += 12 + n + 4 * count
    return out


def test_importance_matrix_is_the_chosen_statistic(tmp_path, monkeypatch):
    """``moments`` writes E[x²] per input column (a whole-model forward's, as llama-imatrix
    computes it); ``gradient`` writes the gradient-weighted one, in its own work folder."""
    from conftest import full_model_statistics

    from windquant.config import FitConfig
    from windquant.gguf.build import GGUFConfig, build_gguf, calibration_statistics
    from windquant.gguf.files import gguf_linear_name
    from windquant.model.units import block_linears
    from windquant.pipeline import calibration_windows
    from windquant.runtime.loading import load_model

    monkeypatch.setenv("WINDQUANT_LLAMACPP", str(tmp_path / "no-llamacpp"))
    src = write_random_llama(tmp_path / "tiny.gguf")
    fit = FitConfig(calib_samples=4, calib_len=32)
    written = {}
    for kind in ("moments", "gradient"):
        report = build_gguf(str(src), None, GGUFConfig(target_bpw=5.0, importance=kind), fit, tmp_path / "w", progress=False)
        written[kind] = _read_imatrix(Path(report["work_dir"]) / "imatrix.dat")
    model, tok = load_model(str(src))
    scales, _ = full_model_statistics(model, calibration_windows(tok, fit, model=model))
    names = {gguf_linear_name(layer, proj): name for layer, name, proj, _ in block_linears(model)}
    assert set(written["moments"]) == set(names)
    _m, imatrices, _f = calibration_statistics(str(src), fit, progress=False)
    for gname, name in names.items():
        np.testing.assert_allclose(written["moments"][gname], (scales[name] ** 2).numpy(), rtol=1e-4)
        np.testing.assert_allclose(written["gradient"][gname], imatrices["gradient"][gname], rtol=1e-6)
        ratio = written["gradient"][gname] / written["moments"][gname]
        assert ratio.max() > 1.01 * ratio.min()  # a reweighting, not a rescaling
    works = {Path(build_gguf(str(src), None, GGUFConfig(5.0, importance=k), fit, tmp_path / "w", progress=False)["work_dir"]) for k in written}
    assert len(works) == 2  # the costs depend on the matrix: one work folder each
