"""benchmarks/peers.py's standing: each peer row against the best windquant row at equal or fewer
true bits, on hand-made rows."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402


def row(key: str, method: str, bits: float, wiki2: float, **extra) -> dict:
    return {"key": key, "method": method, "true_bits": bits, "wiki2": {"ppl": wiki2}, **extra}


def test_a_preset_in_the_references_own_type_is_shown_but_not_counted():
    rows = [
        row("reference", "reference", 16.0, 10.0),
        row("windquant:ilp@4", "windquant ilp", 4.0, 12.0),
        row("gptq:4g128", "GPTQ", 4.2, 13.0),
        row("llamacpp:Q4_0", "llama.cpp", 4.5, 11.0, source_types={"same": 3, "of": 126}),
        row("llamacpp:windquant@Q4_0", "windquant gguf", 4.5, 11.5),
        row("llamacpp:Q4_K_M", "llama.cpp", 5.4, 10.0, source_types={"same": 126, "of": 126}),
        row("llamacpp:windquant@Q4_K_M", "windquant gguf", 5.4, 10.5),
    ]
    lines = peers.standing_lines(rows)
    by_key = {ln.split(" | ")[0].lstrip("| "): ln for ln in lines if ln.startswith("| ")}
    assert "windquant (×0.923)" in by_key["gptq:4g128"]  # 12 / 13, against ilp@4 (GGUF rows are not Python peers' rivals)
    assert "peer (windquant ×1.045)" in by_key["llamacpp:Q4_0"]  # 11.5 / 11, a partial source-type overlap counts
    assert "not counted" in by_key["llamacpp:Q4_K_M"] and "×1.050" in by_key["llamacpp:Q4_K_M"]
    assert lines[-1] == (
        "windquant is lower on 1 of 2 peer rows at equal or fewer true bits; windquant is not lower on llamacpp:Q4_0; "
        "not counted, as they re-find the reference GGUF's stored grid (every block linear in its own type): llamacpp:Q4_K_M."
    )


def test_zero_shot_cell_adds_the_paired_difference_when_both_rows_kept_documents():
    def zs(piqa: str, arc: str) -> dict:
        runs = {"piqa": piqa, "arc_easy": arc}
        results = {t: {"acc": c.count("1") / len(c), "correct": c} for t, c in runs.items()}
        return {"zeroshot": results, "zeroshot_avg": sum(r["acc"] for r in results.values()) / 2}

    peer = row("llamacpp:Q2_K", "llama.cpp", 4.2, 11.0, **zs("1100", "10"))
    ours = row("llamacpp:windquant@Q2_K", "windquant gguf", 4.2, 10.0, **zs("1010", "11"))
    # averages 50.0 / 75.0; paired +25.0 ± 100 * sqrt(1/6 + 1/4) / 2 = 32.3 (by hand, as in test_zeroshot)
    assert peers.zeroshot_pair_cell(peer, ours) == "50.0 / 75.0 (paired +25.0 ± 32.3)"
    bare = {k: v for k, v in ours.items() if k != "zeroshot"}
    assert peers.zeroshot_pair_cell(peer, bare) == "50.0 / 75.0"  # no per-document results: averages only
    assert peers.zeroshot_pair_cell(peer, row("k", "windquant ilp", 4.0, 10.0)) == "–"
