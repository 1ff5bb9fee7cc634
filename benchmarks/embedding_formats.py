"""Which storage of the tied embedding keeps perplexity? Formats of SmolLM2's 49,152 × 576
embedding (also its output head) on the unquantized reference, every other weight untouched:

* ``8``, ``4g32``: the checkpoint's row formats (``windquant.quant.rows``: INT8 per row; INT4
  with a scale per 32 columns, clipped by least squared error);
* ``freq8-S``: the share S of rows whose tokens are most frequent in the ``mix`` calibration
  corpus at 8 bits, the rest at 4g32 (~5 bits per weight at S = 0.14);
* ``mixed-by-{windows,corpus,id}``: the checkpoint's ``mixed`` format, its rows ranked by the
  token counts of quantize's calibration windows, of the whole ``mix`` corpus, or by token id;
* ``gptq4g32``: 4g32 with GPTQ error feedback (``windquant.quant.feedback``) on the head's
  objective, ``H`` = second moment of the final hidden states on 32 calibration windows.

    python benchmarks/embedding_formats.py --data-dir ../shared/data --other other_domain.txt \\
        --out benchmarks/results/embedding_formats
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import command_line, results_folder, save_rows, write_markdown  # noqa: E402

from windquant.calib.corpus import corpus_tokens, mix_text, sample_windows, window_bos  # noqa: E402
from windquant.calib.statistics import head_input_moment  # noqa: E402
from windquant.config import FitConfig  # noqa: E402
from windquant.eval.perplexity import perplexity  # noqa: E402
from windquant.model.loading import load_base_model  # noqa: E402
from windquant.pipeline import calibration_windows  # noqa: E402
from windquant.quant.feedback import error_feedback  # noqa: E402
from windquant.quant.rows import GROUP4, clip_scales4, dequantize_rows, quantize_rows  # noqa: E402


def gptq_4g32(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """4g32 codes chosen column by column with GPTQ feedback; each group's scale is the clipped
    absmax of least squared error on the columns as compensated so far."""

    def start(_k, wk):
        scale = clip_scales4(wk).float()
        return lambda col, _j: (col / scale).round().clamp(-7, 7) * scale

    chunks = [(c, c + GROUP4) for c in range(0, w.shape[1], GROUP4)]
    with torch.no_grad():
        return error_feedback(w, h, chunks, start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default="/work/shared/data")
    ap.add_argument("--other", required=True, help="text of another domain (never a calibration source)")
    ap.add_argument("--wiki-windows", type=int, default=6, help="WikiText-2 test windows of 2048 tokens")
    ap.add_argument("--other-windows", type=int, default=24, help="--other windows of 512 tokens")
    ap.add_argument("--formats", default="", help="only these formats, comma-separated (default: all; fp32 always)")
    ap.add_argument("--out", default="benchmarks/results/embedding_formats")
    args = ap.parse_args()
    out, rows = results_folder(args.out)
    model, tok = load_base_model("smollm2-135m")
    bos = window_bos(tok)
    emb = model.get_input_embeddings()
    w = emb.weight.data.clone()
    mix_ids = torch.tensor(tok(mix_text())["input_ids"])
    counts = torch.bincount(mix_ids, minlength=w.shape[0])
    # What quantize's calibration windows hold (64 x 256 of mix, seed 0): a small sample of it.
    calib = calibration_windows(tok, FitConfig())
    window_counts = torch.bincount(calib.reshape(-1), minlength=w.shape[0])
    wiki = corpus_tokens(tok, "wikitext2", "eval", args.data_dir)
    other = torch.tensor(tok(Path(args.other).read_text(encoding="utf-8"))["input_ids"])
    w8 = dequantize_rows(quantize_rows(w, 8), 8)
    w4 = dequantize_rows(quantize_rows(w, 4), 4)

    def freq8(share: float) -> torch.Tensor:
        top = torch.argsort(counts, descending=True)[: int(share * len(w))]
        mixed = w4.clone()
        mixed[top] = w8[top]
        return mixed

    formats = {
        "fp32": lambda: w.clone(),
        "8": lambda: w8,
        "4g32": lambda: w4,
        "freq8-0.14": lambda: freq8(0.14),
        "freq8-0.25": lambda: freq8(0.25),
        # The checkpoint's mixed format (MIXED_SHARE8 of the rows at 8 bits), ranked three ways:
        "mixed-by-windows": lambda: dequantize_rows(quantize_rows(w, "mixed", window_counts), "mixed"),
        "mixed-by-corpus": lambda: dequantize_rows(quantize_rows(w, "mixed", counts), "mixed"),
        "mixed-by-id": lambda: dequantize_rows(quantize_rows(w, "mixed"), "mixed"),
        "mixed-by-corpus-gptq": lambda: dequantize_rows(
            quantize_rows(w, "mixed", counts, head_input_moment(model, calib)), "mixed"
        ),
        "gptq4g32": lambda: gptq_4g32(w, head_input_moment(model, sample_windows(mix_ids, 32, 256, 0, bos))),
    }
    wanted = {"fp32", *filter(None, args.formats.split(","))} if args.formats else set(formats)
    for key, make in formats.items():
        if key in rows or key not in wanted:
            continue
        emb.weight.data = w.clone()  # the head moment is taken on the unquantized model
        emb.weight.data = make()
        rows[key] = {
            "key": key,
            "wiki2": perplexity(model, wiki, ctx=2048, max_windows=args.wiki_windows, bos_id=bos, progress=False).ppl,
            "other": perplexity(model, other, ctx=512, max_windows=args.other_windows, bos_id=bos, progress=False).ppl,
        }
        print(key, rows[key], flush=True)
        save_rows(out / "results.json", rows, {"args": vars(args)})
    ref = rows["fp32"]
    lines = [
        f"SmolLM2-135M reference, only the tied embedding stored differently. WikiText-2 test first "
        f"{args.wiki_windows} windows of 2048; {args.other} first {args.other_windows} windows of 512.",
        "",
        "| embedding | WikiText-2 PPL (change) | other-domain PPL (change) |",
        "|---|---|---|",
    ]
    for key, r in rows.items():
        lines.append(
            f"| {key} | {r['wiki2']:.3f} ({100 * (r['wiki2'] / ref['wiki2'] - 1):+.1f} %) | "
            f"{r['other']:.3f} ({100 * (r['other'] / ref['other'] - 1):+.1f} %) |"
        )
    write_markdown(out, lines, command_line())
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
