"""Zero-shot accuracy through lm-eval on tiny local tasks in the benchmarks' original file formats."""

import json

import pytest
import torch
from conftest import make_gemma3

from windquant.cli import main
from windquant.errors import WindquantError
from windquant.eval.zeroshot import evaluate_zeroshot, macro_average, paired_difference

PIQA = [
    ("How do I boil water?", "Put it in a pot on the stove.", "Put it in the freezer overnight.", 0),
    ("To dry wet shoes", "fill them with ice", "stuff them with newspaper", 1),
    ("Make toast.", "Put bread in a toaster.", "Put bread in a bowl of soup for an hour.", 0),
    ("Open a jar", "twist the lid", "bake the lid", 0),
    ("Clean a window", "spray it with mud and wait", "wipe it with a damp cloth", 1),
]
ARC = [
    ("Which is a liquid at room temperature?", [("water", "A"), ("iron", "B"), ("salt crystal", "C")], "A"),
    ("What do plants need to make food?", [("sunlight", "1"), ("plastic", "2"), ("sand", "3"), ("glass", "4")], "1"),
    ("Which animal can fly?", [("a cow", "A"), ("a small bird", "B"), ("a fish", "C"), ("a worm", "D")], "B"),
    ("What makes a compass needle move?", [("magnetism", "A"), ("sound", "B")], "A"),
]


def write_tasks(root):
    """piqa/ and arc_easy/ under ``root`` in the original release formats (labels in a separate file for PIQA)."""
    (root / "piqa").mkdir(parents=True)
    (root / "piqa" / "valid.jsonl").write_text(
        "".join(json.dumps({"goal": g, "sol1": a, "sol2": b}) + "\n" for g, a, b, _ in PIQA)
    )
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{y}\n" for *_, y in PIQA))
    (root / "arc_easy").mkdir()
    rows = [
        {"id": f"q{i}", "question": {"stem": q, "choices": [{"text": t, "label": lab} for t, lab in ch]}, "answerKey": key}
        for i, (q, ch, key) in enumerate(ARC)
    ]
    (root / "arc_easy" / "ARC-Easy-Test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def reference_docs():
    """(context, choices, gold) exactly as lm-eval's piqa / arc_easy prompts render them."""
    piqa = [(f"Question: {g}\nAnswer:", [a, b], y) for g, a, b, y in PIQA]
    arc = [(f"Question: {q}\nAnswer:", [t for t, _ in ch], [lab for _, lab in ch].index(key)) for q, ch, key in ARC]
    return {"piqa": piqa, "arc_easy": arc}


@torch.no_grad()
def reference_accuracy(model, tokenizer, docs):
    """acc / acc_norm computed directly: summed log-likelihood of " " + choice after the context;
    and which documents ``acc`` got right, as a 0/1 string."""
    correct, norm = "", 0
    for context, choices, gold in docs:
        ctx_ids = tokenizer.encode(context)
        lls = []
        for choice in choices:
            ids = tokenizer.encode(context + " " + choice)
            assert ids[: len(ctx_ids)] == ctx_ids
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            lls.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(ctx_ids), len(ids))))
        correct += "1" if max(range(len(lls)), key=lambda i: lls[i]) == gold else "0"
        norm += max(range(len(lls)), key=lambda i: lls[i] / len(choices[i])) == gold
    return correct.count("1") / len(docs), norm / len(docs), correct


def test_accuracy_matches_direct_loglikelihoods(tiny_model, tokenizer, tmp_path):
    data = write_tasks(tmp_path / "zeroshot")
    res = evaluate_zeroshot(
        tiny_model, tokenizer, ["piqa", "arc_easy"], data_dir=str(data), batch_size=3, progress=False, per_document=True
    )
    for task, docs in reference_docs().items():
        acc, acc_norm, correct = reference_accuracy(tiny_model, tokenizer, docs)
        expect = {"acc": pytest.approx(acc, abs=1e-12), "acc_norm": pytest.approx(acc_norm, abs=1e-12), "n": len(docs)}
        assert res[task] == {**expect, "correct": correct}
    assert macro_average(res) == pytest.approx((res["piqa"]["acc"] + res["arc_easy"]["acc"]) / 2)
    # the parent folder (holding zeroshot/) is accepted too, and --limit scores the first N documents
    limited = evaluate_zeroshot(tiny_model, tokenizer, ["arc_easy"], data_dir=str(tmp_path), limit=2, progress=False)
    acc, acc_norm, _ = reference_accuracy(tiny_model, tokenizer, reference_docs()["arc_easy"][:2])
    assert limited["arc_easy"] == {"acc": pytest.approx(acc), "acc_norm": pytest.approx(acc_norm), "n": 2}


def test_saved_checkpoint_scores_like_the_in_memory_model(tiny_model, tokenizer, tiny_plan, tiny_fit, tmp_path):
    from windquant import load, quantize_, save
    from windquant.eval.perplexity import perplexity

    data = write_tasks(tmp_path / "zs")
    plan, _ = quantize_(tiny_model, tokenizer, tiny_plan, tiny_fit, progress=False)
    loaded = load(save(tiny_model, tokenizer, plan, tmp_path / "ckpt"), runtime=False)
    tokens = torch.randint(0, 256, (4 * 64,), generator=torch.Generator().manual_seed(0))
    scores = [
        (
            evaluate_zeroshot(m, tokenizer, ["piqa", "arc_easy"], str(data), progress=False),
            perplexity(m, tokens, 64, progress=False),
        )
        for m in (tiny_model, loaded)
    ]
    (zs_mem, ppl_mem), (zs_disk, ppl_disk) = scores
    assert zs_disk == zs_mem
    assert ppl_disk.ppl == pytest.approx(ppl_mem.ppl, rel=1e-6) and ppl_disk.tokens == ppl_mem.tokens


def test_missing_file_and_unknown_task_are_clear_errors(tiny_model, tokenizer, tmp_path):
    data = write_tasks(tmp_path)
    (data / "piqa" / "valid-labels.lst").unlink()
    with pytest.raises(WindquantError, match=r"zero-shot task piqa: missing .*piqa/valid-labels.lst"):
        evaluate_zeroshot(tiny_model, tokenizer, ["piqa"], str(data), progress=False)
    with pytest.raises(WindquantError, match=r"zero-shot task hellaswag: missing .*hellaswag/hellaswag_val.jsonl"):
        evaluate_zeroshot(tiny_model, tokenizer, ["hellaswag"], str(data), progress=False)
    with pytest.raises(WindquantError, match="unknown zero-shot task 'mmlu'"):
        evaluate_zeroshot(tiny_model, tokenizer, ["mmlu"], str(data), progress=False)


def test_cli_tasks_json_and_errors(tiny_model_dir, tmp_path, capsys):
    data = write_tasks(tmp_path / "zs")
    out = tmp_path / "r.json"
    argv = ["eval", str(tiny_model_dir), "--tasks", "piqa,arc_easy", "--data-dir", str(data), "--limit", "3", "--quiet"]
    assert main([*argv, "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["piqa", "arc_easy", "avg"]  # --tasks alone: no perplexity
    assert lines[0].startswith("piqa: acc=") and "acc_norm=" in lines[0] and lines[0].endswith("n=3")
    saved = json.loads(out.read_text())
    assert set(saved["zeroshot"]) == {"piqa", "arc_easy"} and "ppl" not in saved
    assert saved["zeroshot_avg_acc"] == pytest.approx(macro_average(saved["zeroshot"]))
    corpus = tmp_path / "c.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    assert main([*argv, "--corpus", str(corpus), "--ctx", "64"]) == 0  # explicit --corpus: both
    printed = capsys.readouterr().out
    assert "ppl=" in printed and "avg: acc=" in printed
    for bad, match in [
        (["--tasks", "piqa,magic"], "unknown zero-shot task 'magic'"),
        (["--tasks", "winogrande", "--data-dir", str(data)], "winogrande/dev.jsonl"),
    ]:
        assert main(["eval", str(tiny_model_dir), *bad]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "windquant" in line or "Traceback" in line]
        assert len(err) == 1 and match in err[0], err


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_shared_context_loglikelihoods_equal_hflms(arch, tiny_model, tokenizer):
    """One row per document (the context, then every choice seeing only the context and itself)
    gives HFLM's own (log-likelihood, greedy) for every request: rows of different lengths in one
    left-padded batch, choices of different lengths, one-token choices, a request alone in its
    group; a document longer than Gemma-3's sliding window (110 positions > 96) and one longer than
    the model's window go to HFLM's path. On LLaMA and on Gemma-3 (sliding and global layers)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from windquant.eval.shared_context import SharedContextLM

    model = tiny_model if arch == "llama" else make_gemma3()
    pairs = [
        ("Question: which is wet?\nAnswer:", " water"),
        ("Question: which is wet?\nAnswer:", " a dry stone on a hot day"),
        ("Question: which is wet?\nAnswer:", " x"),
        ("The cat sat on the", " mat"),
        ("The cat sat on the", " m"),
        ("A lone context", " with its one continuation, longer than the others here"),
        ("s" * 90, " " + "t" * 20),  # 90 context tokens + 21 (byte-level tokens): 110 positions
        ("word " * 200, " end of a long request"),
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    expected = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=128).loglikelihood(requests, disable_tqdm=True)
    shared = SharedContextLM(pretrained=model, tokenizer=tokenizer, batch_size=3, max_length=128)
    shapes = []
    handle = model.register_forward_hook(lambda m, args, kwargs, out: shapes.append(tuple((args[0] if args else kwargs["input_ids"]).shape)), with_kwargs=True)
    try:
        got = shared.loglikelihood(requests, disable_tqdm=True)
        assert len(got) == len(pairs)
        for (ll, greedy), (ll_ref, greedy_ref) in zip(got, expected):
            assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-4) and greedy == greedy_ref
        # Not a no-op: the first document's three choices are one row, the context's tokens once.
        shapes.clear()
        shared.loglikelihood(requests[:3], disable_tqdm=True)
        context = len("Question: which is wet?\nAnswer:")
        assert shapes == [(1, context + len(" water") - 1 + len(" a dry stone on a hot day") - 1 + len(" x") - 1)]
    finally:
        handle.remove()


def test_paired_difference_by_hand():
    a = {"piqa": {"correct": "1100"}, "arc_easy": {"correct": "10"}}
    b = {"piqa": {"correct": "1010"}, "arc_easy": {"correct": "11"}}
    # piqa: differences 0,-1,+1,0 -> mean 0, sample variance 2/3, variance of the mean 1/6;
    # arc_easy: 0,+1 -> mean 1/2, sample variance 1/2, of the mean 1/4. Macro: (0 + 1/2) / 2,
    # error sqrt(1/6 + 1/4) / 2.
    diff, err = paired_difference(a, b)
    assert diff == pytest.approx(0.25) and err == pytest.approx((1 / 6 + 1 / 4) ** 0.5 / 2)
    same = paired_difference(a, a)
    assert same == (0.0, 0.0)
    assert paired_difference(a, {"piqa": b["piqa"]}) is None  # a task without per-document results
    assert paired_difference(a, {**b, "arc_easy": {"correct": "1"}}) is None  # other documents


def test_cli_reference_shows_the_paired_difference(tiny_model, tokenizer, tiny_plan, tiny_fit, tiny_model_dir, tmp_path, capsys):
    from windquant import quantize_, save

    data = write_tasks(tmp_path / "zs")
    plan, _ = quantize_(tiny_model, tokenizer, tiny_plan, tiny_fit, progress=False)
    ckpt = save(tiny_model, tokenizer, plan, tmp_path / "ckpt")
    out = tmp_path / "r.json"
    argv = ["eval", str(ckpt), "--reference", str(tiny_model_dir), "--tasks", "piqa,arc_easy", "--data-dir", str(data)]
    assert main([*argv, "--quiet", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    for payload in (saved, saved["reference"]):  # both scored with per-document results
        assert all(len(r["correct"]) == r["n"] for r in payload["zeroshot"].values())
    diff, err = paired_difference(saved["reference"]["zeroshot"], saved["zeroshot"])
    n = sum(r["n"] for r in saved["zeroshot"].values())
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("zero-shot avg acc, quantized - reference"))
    assert line.endswith(f"{100 * diff:+.1f} ± {100 * err:.1f} points (paired, the same {n:,} documents)")
