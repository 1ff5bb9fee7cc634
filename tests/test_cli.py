"""The CLI end to end on a tiny local model, and every bad input named in the brief."""

import json

import pytest

from windquant.cli import main


@pytest.fixture
def corpus_file(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    return f


def quantize_args(model_dir, out, corpus, cache, *extra):
    return [
        "quantize",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--group-size",
        "32",
        "--calib",
        str(corpus),
        "--calib-samples",
        "4",
        "--calib-len",
        "32",
        "--steps",
        "2",
        "--target-bits",
        "3.2",
        "--cache-dir",
        str(cache),
        "--quiet",
        *extra,
    ]


def test_quantize_eval_inspect_generate(tiny_model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(quantize_args(tiny_model_dir, out, corpus_file, tmp_path / "c", "--target-bits", "3.2", "--embedding-bits", "mixed")) == 0
    printed = capsys.readouterr().out
    labels = [line.split(":")[0] for line in printed.splitlines() if line[:1].strip()]
    assert [x for x in labels if x != "scores"][:6] == ["wrote", "whole file", "block linears", "actions", "time", "next"]
    assert "MiB of tensors" in printed and "bits per parameter" in printed and "true bits per weight" in printed
    assert "share of block-linear weights" in printed and "calibrate" in printed
    assert f"windquant eval {out} --reference {tiny_model_dir}" in printed and f"windquant generate {out} --chat" in printed
    plan = json.loads((out / "plan.json").read_text())
    assert plan["true_bits"] <= 3.2 and "paper_bits" in plan
    # The mixed embedding (the default below 3 target bits): the calibration text's tokens (ids 64-89 for its letters, beyond the
    # first 64 ids a ranking by id would pick) are among the 64 rows kept at 8 bits.
    assert json.loads((out / "quant_config.json").read_text())["rows"] == {"model.embed_tokens": "mixed"}
    from safetensors import safe_open
    from transformers import AutoTokenizer

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        kept = set(f.get_tensor("model.embed_tokens.rows_idx8").tolist())
    used = set(AutoTokenizer.from_pretrained(tiny_model_dir)(corpus_file.read_text())["input_ids"])
    assert max(used) >= 64 and used <= kept
    report = json.loads((out / "run_report.json").read_text())
    assert {"load", "calibrate", "fit", "allocate", "apply", "pack"} <= set(report["timings"]["seconds"])
    assert report["timings"]["peak_rss_mib"] > 0
    assert main(["eval", str(out), "--corpus", str(corpus_file), "--ctx", "64", "--quiet"]) == 0
    line = capsys.readouterr().out
    assert "ppl=" in line and "ctx=64" in line and "tokens=" in line
    assert main(["inspect", str(out)]) == 0
    assert "action distribution" in capsys.readouterr().out
    assert (out / "bitmap.png").stat().st_size > 1000
    assert main(["generate", str(out), "--prompt", "The", "--max-new-tokens", "4"]) == 0


def test_dry_run_prints_sizes_without_writing(tiny_model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(quantize_args(tiny_model_dir, out, corpus_file, tmp_path / "c", "--dry-run")) == 0
    assert "units:" in capsys.readouterr().out
    assert not out.exists()


def expect_error(argv, capsys, match, code=2):
    assert main(argv) == code
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if "windquant" in line or "Traceback" in line]
    assert len(err) == 1 and match in err[0], stderr  # one readable line, no traceback


def test_missing_model_file(tmp_path, capsys):
    expect_error(
        ["quantize", "--model", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o")], capsys, "model file not found"
    )


def test_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 20)
    expect_error(["quantize", "--model", str(bad), "--out", str(tmp_path / "o")], capsys, "could not read GGUF file")
    assert not (tmp_path / "o").exists()


def test_truncated_checkpoint(tiny_model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(quantize_args(tiny_model_dir, out, corpus_file, tmp_path / "c")) == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    capsys.readouterr()
    expect_error(["eval", str(out), "--corpus", str(corpus_file), "--ctx", "64"], capsys, "corrupt or truncated")
    (out / "quant_config.json").write_text("{not json")
    expect_error(["eval", str(out), "--corpus", str(corpus_file)], capsys, "corrupt")


def test_unknown_allocator(tmp_path, capsys):
    expect_error(["quantize", "--allocator", "magic", "--out", str(tmp_path / "o")], capsys, "unknown allocator 'magic'")


@pytest.mark.parametrize("bits, match", [("17", "must be in (0, 16]"), ("0", "must be in (0, 16]")])
def test_target_bits_out_of_range(bits, match, tmp_path, capsys):
    expect_error(["quantize", "--target-bits", bits, "--out", str(tmp_path / "o")], capsys, match)


def test_target_below_cheapest_plan(tiny_model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "o"
    expect_error(
        quantize_args(tiny_model_dir, out, corpus_file, tmp_path / "c", "--target-bits", "0.5"), capsys, "below the cheapest"
    )
    assert not out.exists()


def test_chunk_zero(tmp_path, capsys):
    expect_error(["quantize", "--group-size", "0", "--out", str(tmp_path / "o")], capsys, "chunk must be a positive number of columns, got 0 (set with --group-size)")


def test_empty_calibration_file(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    expect_error(quantize_args(tiny_model_dir, tmp_path / "o", empty, tmp_path / "c"), capsys, "is empty")


def test_existing_output_dir_needs_overwrite(tiny_model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    expect_error(quantize_args(tiny_model_dir, out, corpus_file, tmp_path / "c"), capsys, "already exists; pass --overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    assert main(quantize_args(tiny_model_dir, out, corpus_file, tmp_path / "c", "--overwrite")) == 0
    assert (out / "plan.json").is_file() and not (out / "keep.txt").exists()


def test_ctrl_c_mid_save_leaves_nothing(tiny_model_dir, corpus_file, tmp_path, capsys, monkeypatch):
    import windquant.pack.checkpoint as ckpt

    def interrupted(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", interrupted)
    out = tmp_path / "ckpt"
    expect_error(quantize_args(tiny_model_dir, out, corpus_file, tmp_path / "c"), capsys, "interrupted", code=130)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt")] == []


def test_uniform_action_needs_no_target(tiny_model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "u8"
    args = quantize_args(tiny_model_dir, out, corpus_file, tmp_path / "c")
    args.remove("--target-bits"), args.remove("3.2")
    assert main([*args, "--allocator", "uniform", "--uniform-action", "8"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert {u["applied"] for u in plan["units"]} == {8.0} and plan["target_bits"] is None
    expect_error([*args, "--uniform-action", "8", "--overwrite"], capsys, "--uniform-action is a setting of the uniform allocator")


def test_sweep_writes_rows_table_and_plot(tiny_model_dir, corpus_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = quantize_args(tiny_model_dir, tmp_path / "unused", corpus_file, tmp_path / "c")
    args = [a for a in args[1:] if a not in ("--out", str(tmp_path / "unused"), "--target-bits", "3.2")]
    argv = [
        "sweep",
        *args,
        "--target-bits",
        "3.0,4.5",
        "--allocators",
        "uniform,heuristic,ilp",
        "--corpus",
        str(corpus_file),
        "--ctx",
        "64",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows[0]["allocator"] == "reference"
    scored = [r for r in rows[1:] if "ppl" in r]
    assert {(r["allocator"], r["budget"]) for r in scored} == {
        (a, b) for a in ("uniform", "heuristic", "ilp") for b in (3.0, 4.5)
    }
    assert all(r["true_bits"] <= r["budget"] for r in scored)
    assert (out / "pareto.png").stat().st_size > 1000 and "| ilp |" in (out / "results.md").read_text()


def test_an_interrupted_sweep_resumes_at_its_first_unfinished_row(tiny_model_dir, corpus_file, tmp_path, monkeypatch):
    import windquant.sweep as sweep

    out = tmp_path / "sweep"
    args = quantize_args(tiny_model_dir, tmp_path / "unused", corpus_file, tmp_path / "c")
    args = [a for a in args[1:] if a not in ("--out", str(tmp_path / "unused"), "--target-bits", "3.2")]
    argv = ["sweep", *args, "--target-bits", "3.0,4.5", "--allocators", "uniform,ilp", "--corpus", str(corpus_file), "--ctx", "64"]
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())["rows"]

    real, planned = sweep.make_plan, []

    def killed_at_the_third_row(prepared, cfg, *a, **k):
        if len(planned) == 2:
            raise KeyboardInterrupt
        planned.append((cfg.allocator, cfg.target_bits))
        return real(prepared, cfg, *a, **k)

    monkeypatch.setattr(sweep, "make_plan", killed_at_the_third_row)
    assert main([*argv, "--out", str(out)]) != 0  # interrupted
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 3  # the reference and two rows
    planned.clear()
    monkeypatch.setattr(sweep, "make_plan", lambda prepared, cfg, *a, **k: planned.append((cfg.allocator, cfg.target_bits)) or real(prepared, cfg, *a, **k))
    assert main([*argv, "--out", str(out)]) == 0
    assert planned == [("uniform", 4.5), ("ilp", 4.5)]  # only the unfinished rows
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["allocator"], r["budget"], r["ppl"]) for r in rows] == [(r["allocator"], r["budget"], r["ppl"]) for r in whole]
    planned.clear()
    assert main([*argv, "--out", str(out), "--target-bits", "3.0", "--max-windows", "1"]) == 0  # other settings: nothing kept
    assert planned == [("uniform", 3.0), ("ilp", 3.0)]
